"""Runs inside the sandbox: loads X_train, runs the agent's ``denoise``, saves its output."""


def main(train_path, output_path, agent_source):
    import numpy as np

    save = np.save
    x = np.load(train_path)
    namespace = {"__name__": "agent_denoiser"}
    exec(compile(agent_source, "agent_denoiser.py", "exec"), namespace)
    denoise = namespace.get("denoise")
    if not callable(denoise):
        raise NameError("the code must define denoise(counts)")
    output = np.asarray(denoise(x.copy()))
    save(output_path, output.astype(np.float64) if output.dtype.kind in "biuf" else output)
    return {"shape": list(output.shape), "dtype": str(output.dtype)}
