"""Network pieces: the cross-stitch unit, single-task columns, and the network that stitches them."""
