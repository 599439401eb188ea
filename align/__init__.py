"""align: build vision-language reasoning models (encoder + projector + reasoning LLM).

Stages: projector alignment -> long-CoT SFT -> GRPO. Outputs are standard Hugging Face Llava folders.
See README.md for the tour and ``align --help`` for the commands.
"""

__version__ = "0.1.0"
