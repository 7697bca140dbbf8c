"""Post-training: SFT, LoRA / QLoRA, reward models, rejection sampling, DPO, PPO, distillation (Llama 3's recipe)."""
