"""Score one answer to one reasoning-gym item: the program :mod:`spear_engine.envs.math_tool` runs in the sandbox.

Never imported by the engine: ``math_tool`` reads this file and runs its text as the sandbox's code
(:func:`spear_engine.envs.sandbox.run_python`, a fresh isolated interpreter) followed by one line,
``main(<spec JSON>)``. The spec names the dataset (``name``, ``seed``, ``kwargs``) and carries the
``answer`` and whether the gold answer is a number (``numeric``). The last line printed is
``{"score": <float>}``. It imports nothing from spear_engine: the sandbox runs it as plain code.
"""

import json
import logging


def main(spec_json):
    import reasoning_gym

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    spec = json.loads(spec_json)
    dataset = reasoning_gym.create_dataset(spec["name"], seed=spec["seed"], size=1, **spec["kwargs"])
    entry = dataset[0]
    try:
        score = float(dataset.score_answer(answer=spec["answer"], entry=entry))
    except Exception:
        score = 0.0
    if score < 1.0 and spec["numeric"]:
        from math_verify import parse, verify

        try:
            if verify(parse(str(entry["answer"]), parsing_timeout=None), parse(spec["answer"], parsing_timeout=None),
                      timeout_seconds=None):
                score = 1.0
        except Exception:
            pass
    print(json.dumps({"score": score}))
