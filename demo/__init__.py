"""The project's own toy diffusion model: synthetic scenes, its trainer and its evaluation.

``demo.scenes`` draws coloured shapes with exact masks, ``demo.train`` trains a tiny Stable
Diffusion on them (diffusers layout, loadable with ``StableSeg.from_pretrained("demo/model")``)
and ``demo.evaluate`` measures StableSeg's mIoU on the shipped scenes.
"""
