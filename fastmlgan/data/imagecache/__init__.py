"""The decoded-image cache (FFCV style): ``format`` (the file: layout, open, verify, read rows),
``build`` (write one, ensure a run's is current), ``decode`` (the decoders that fill it),
``loader`` (serve batches from it: the ``cache`` backend)."""
