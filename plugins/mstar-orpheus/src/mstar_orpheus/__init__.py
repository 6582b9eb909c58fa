"""mstar-orpheus: Orpheus TTS (canopylabs/orpheus-3b-0.1-ft + hubertsiuzdak/snac_24khz)."""
