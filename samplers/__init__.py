"""Noise schedules and samplers of the official GDF code, plus the cascade runners."""
