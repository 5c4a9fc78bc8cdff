"""`python -m fusedit` (used by torchrun inside a pod: `torchrun ... -m fusedit train ...`)."""
from fusedit.cli import main

main()
