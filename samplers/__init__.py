"""Pure math of the official GDF code: the noise schedule, one function per sampler, CFG, seeded noise and the
image-to-image start. Nothing here loads networks or knows the host."""
