"""The README's quickstart runs as written, and its first lines are the two commands."""

import math
import pathlib
import re

import lora_jax

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    env = {}
    exec(compile(blocks[0], "README quickstart", "exec"), env)
    assert lora_jax.is_lora(env["trainable"]["layers_0"]["kernel"])
    assert env["plain"]["layers_0"]["kernel"].shape == (64, 256)
    assert math.isfinite(float(env["value"]))


def test_readme_commands_match_ci():
    shell = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert "train.demo" in shell[0] and "pytest" in shell[1]
    ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert shell[1].strip() in ci
