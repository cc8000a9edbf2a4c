"""The adapter bank: many adapters at once, each batch row routed to its own (``bank``: the stacked tensors;
``routing``: the routed ops graph nodes call; ``swap``: hot swaps into a bank)."""
