"""The scores of a map, one module each: deletion_insertion.py (RISE), road.py (ROAD), pointing.py (pointing game
and relevance mass accuracy against ground-truth masks). Each returns one number per image, so that
statistics.py can put a confidence interval on the mean."""
