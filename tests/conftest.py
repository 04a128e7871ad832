import os

from train.hosts import COMPILE_CACHE_ENV, compile_cache_dir

# The trainers' persistent compilation cache (`train.hosts.use_compile_cache`): one directory for the
# whole session and the processes it starts, fixed before any test points LORA_JAX_CACHE elsewhere.
os.environ.setdefault(COMPILE_CACHE_ENV, str(compile_cache_dir(None)))
