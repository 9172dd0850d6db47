"""Remote code shipped with the tiny EXAONE-architecture model (copied into its folder)."""
