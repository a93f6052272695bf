"""The drop-in layer: flashsdpa in place of torch's SDPA, and in transformers and diffusers models.

`flashsdpa.integrations.sdpa` patches `torch.nn.functional.scaled_dot_product_attention`
(its `enable`, `disable` and `sdpa` are re-exported as `flashsdpa.enable`,
`flashsdpa.disable` and `flashsdpa.sdpa`); `flashsdpa.integrations.transformers`
and `flashsdpa.integrations.diffusers` import those libraries only when they
are imported themselves. Nothing here switches itself on at import.
"""
