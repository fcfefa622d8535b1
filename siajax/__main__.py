from siajax.cli import entry

entry()
