"""Building blocks that know nothing of images: attention, RoPE, KV cache, decoder, ViT."""
