"""train.lm's exports (PEFT, merged HF directory, GGUF) against transformers and PEFT on the real
SmolLM2-135M-Instruct; what is compared and how: `support.lm_export_check`.

    python -m bench.lm_export            # prints the figures; --json PATH writes them too
"""

import sys

from support.lm_export_check import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
