"""Tools for looking at the data and at training runs; none of them is needed to train or predict.

- `python -m tools.show`    a site's six channels as one RGB picture, or a contact sheet of classes
- `python -m tools.curves`  training curves from `<save>.metrics.csv` (needs the optional matplotlib)
"""
