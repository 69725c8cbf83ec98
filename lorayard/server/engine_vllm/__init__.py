"""``--engine vllm``: vLLM's engine behind our API (engine.py), its arguments (config.py), request
parameters (sampling.py) and outputs (outputs.py). Only engine.py imports vLLM: the rest is tested in
the project's own venv; vLLM itself lives in ``.venv-vllm`` (``make install-vllm``)."""
