"""Reading a Pyro model through its traces: the flat latent layout, the per-datum rows as a
function of the latents, the Gaussian prior over the flat latent, and what one call contains."""
