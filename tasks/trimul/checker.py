"""Runs inside the sandbox: loads the cases, calls the agent's ``custom_kernel``, times it.

Trusted wrapper code. Everything it relies on (clock, numpy conversion, file
I/O) is bound to local names before the agent's code runs, so patching
``time.perf_counter`` or ``numpy.asarray`` from the agent's code changes nothing
here. Correctness is judged by the parent process, not here.
"""


def main(cases_path, outputs_path, agent_source, repeats):
    import hashlib
    import time

    import numpy as np

    clock, asarray, load, save, digest = time.perf_counter, np.asarray, np.load, np.savez, hashlib.sha256
    with load(cases_path) as archive:
        data = {k: archive[k] for k in archive.files}
    names = sorted({k.split("/")[0] for k in data})
    namespace = {"__name__": "agent_kernel"}
    exec(compile(agent_source, "agent_kernel.py", "exec"), namespace)
    kernel = namespace.get("custom_kernel")
    if not callable(kernel):
        raise NameError("the code must define custom_kernel(x, mask, weights)")
    outputs, times, modified = {}, {}, []
    for name in names:
        x, mask = data[f"{name}/x"].copy(), data[f"{name}/mask"].copy()
        weights = {k.split("/", 2)[2]: data[k].copy() for k in data if k.startswith(f"{name}/w/")}
        before = digest(x.tobytes() + mask.tobytes() + b"".join(w.tobytes() for w in weights.values())).hexdigest()
        outputs[name] = np.array(asarray(kernel(x, mask, weights)), dtype=np.float32, copy=True)
        if name.startswith("time"):
            samples = []
            for _ in range(repeats):
                start = clock()
                result = asarray(kernel(x, mask, weights))
                samples.append(clock() - start)
            outputs[name + "_last"] = np.array(result, dtype=np.float32, copy=True)
            times[name] = samples
        after = digest(x.tobytes() + mask.tobytes() + b"".join(w.tobytes() for w in weights.values())).hexdigest()
        if after != before:
            modified.append(name)
    save(outputs_path, **outputs)
    return {"times": times, "modified_inputs": modified}
