"""Training engine: models, DP-SGD, privacy accounting and sampling."""
