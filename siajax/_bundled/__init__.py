"""The bundled tasks and kernels: ``siajax._bundled.tasks``, ``siajax._bundled.kernels``.

An installed wheel holds them in this package (pyproject.toml maps the checkout's
top-level ``tasks/`` and ``kernels/`` here); a checkout keeps them at its top level,
which this package's path then takes in. Imported under this name, never as a bare
top-level ``kernels``: that name belongs to Hugging Face's ``kernels`` package,
which transformers imports, and a repo-root ``kernels`` package would shadow it.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
if not (Path(__file__).parent / "kernels").is_dir() and (_CHECKOUT / "kernels" / "trimul").is_dir():
    __path__.append(str(_CHECKOUT))
