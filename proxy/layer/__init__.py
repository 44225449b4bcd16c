"""The encryption layer: the one place where plaintext meets ciphertext."""
