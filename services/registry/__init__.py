"""The registry service: signed, encrypted TGSP adapter packages and their versions."""
