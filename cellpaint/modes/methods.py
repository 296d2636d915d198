"""The names of the submission's methods, one place for each list of choices.

Kept free of numpy: make_submission.py offers them on its command line before it sets the BLAS
thread count, and plates.py, knn.py and knn_submission.py check their arguments against them.
"""
GROUP_METHODS = ("prob", "argmax", "mode")  # plate-group evidence: summed probabilities, arg-max counts, kNN mode
KNN_WEIGHTS = ("sigmoid", "relu-cos")       # a neighbour's vote: sigmoid(cos) (the 41st place's), max(cos, 0)
KNN_SEARCHES = ("group", "cell")            # where the K nearest are sought: in each plate group, in the cell type
KNN_COMBINES = ("mean", "concat")           # several embeddings files: mean then normalise, or normalise and concatenate
ASSIGN_SCORES = ("logsoftmax", "logits", "prob")  # what the per-plate assignment maximises
