"""The engine's bookkeeping: requests, the token-budget scheduler, queue policies, and the paged KV
cache manager (block pool and prefix index). Ids and counts only: no tensors, no model."""
