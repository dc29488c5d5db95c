"""Provider adapters, one official SDK each, behind the contract in ``base``."""
