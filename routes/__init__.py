"""The aiohttp HTTP layer of fltraining."""
