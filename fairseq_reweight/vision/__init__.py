"""Image classification path: CIFAR-10/100 (and sklearn digits) with label noise, CIFAR ResNets,
and ``python -m fairseq_reweight.vision.train``, the reweighted training command. Plain PyTorch;
nothing here imports fairseq.
"""
