"""Fine-tuning: conversations from every common format, chat-template rendering with loss masks, LoRA / DoRA in
PEFT's format, and the SFT data the one Trainer consumes."""
