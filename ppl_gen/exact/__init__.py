"""Exact references the approximations are checked against: BN contraction, Gaussian conditioning, the HMM forward algorithm, LDA's CAVI."""
