"""The cache step: frozen-LLM text features and VAE latents computed once (`fusedit cache build`),
their on-disk format, and the reader the trainer draws its batches from (cached or online)."""

PUBLIC = ("reader",)  # the trainer reads the cache through its reader, never its builder
