"""Sample data shipped with pocketvlm: images, questions, the held-out synthetic QA split, and the trained micro
model (micro/) that `pocketvlm demo` runs offline. Installed as pocketvlm.samples."""
