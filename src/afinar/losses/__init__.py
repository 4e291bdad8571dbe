"""Loss math shared by training, evaluation and the plan: one definition of what is measured.

    supervised.py   the fused head + cross-entropy on answer tokens (SupervisedLoss)
    preference.py   DPO/ORPO losses and the answer log-probabilities they need
    held_out.py     held-out loss, perplexity and token accuracy, as training computes them

Below train/, evaluation/ and plan/, which all use them; above data/ and models/.
"""
