"""How kept K/V live in memory."""
