"""minqlora: QLoRA fine-tuning of Llama-family models in plain PyTorch (Dettmers et al. 2023, arXiv 2305.14314).
See README.md for the map; every module names its paper section and reference test."""
import logging

# On a CPU, bitsandbytes tries to fetch an optional kernel from the Hugging Face hub and logs a warning when it
# can't; minqlora never downloads anything and bitsandbytes' own CPU kernels serve, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
