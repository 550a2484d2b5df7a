"""caitlab: vision-transformer ablations (CaiT / ViT / DeiT)."""
