"""The shared foundation: small pieces every layer may use; it imports nothing of imstream."""
