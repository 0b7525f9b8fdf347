"""The configuration reader: a leaf package every other area imports and that imports none of them.

``tree`` parses, resolves and writes configurations through kconfiglib; ``values`` types the
resolved symbols (and derives each named choice's selection); ``rules`` holds cross-symbol rules;
``errors`` and ``atomic`` are the error base and the atomic file writes everything shares.
"""
