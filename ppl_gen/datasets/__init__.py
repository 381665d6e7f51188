"""Data sets and readers (images, corpora, text); nothing here downloads anything."""
