"""Run the README's quickstart (its first ```python block) with whatever `lora_jax` is installed.

CI runs this in a virtual environment holding only `pip install .` (no extras), from outside the
repository, so that it imports the installed package with its declared dependencies alone.
"""

import math
import pathlib
import re

import lora_jax

readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
env: dict = {}
exec(compile(code, "README quickstart", "exec"), env)
value = float(env["value"])
assert math.isfinite(value), value
assert lora_jax.is_lora(env["trainable"]["layers_0"]["kernel"])
print(f"README quickstart ran with lora_jax from {pathlib.Path(lora_jax.__file__).parent}: "
      f"loss {value:.4f}")
