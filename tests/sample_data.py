"""Small labelled data the tests write for themselves."""

import csv
import random

GOOD = ["great", "fine", "lovely", "superb", "nice", "brilliant"]
BAD = ["awful", "bad", "boring", "dull", "terrible", "weak"]
FILLER = ["the", "movie", "was", "plot", "actors", "story", "really", "quite", "a", "film", "and"]


def write_reviews(path, n, seed, label_names=("negative", "positive")):
    """A learnable rule: the label is the polarity of the one sentiment word in the review."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for _ in range(n):
            positive = rng.random() < 0.5
            words = rng.choices(FILLER, k=rng.randint(2, 8))
            words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if positive else BAD))
            writer.writerow([" ".join(words), label_names[int(positive)]])
    return str(path)
