"""minqlora: QLoRA fine-tuning of Llama-family models in plain PyTorch. See README.md for the map."""
import logging

# On a CPU, bitsandbytes tries to fetch an optional kernel from the Hugging Face hub and logs a warning when it
# can't; minqlora never downloads anything and bitsandbytes' own CPU kernels serve, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
