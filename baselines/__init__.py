"""Attribution baselines on the shared Attributor interface (gradient, perturbation, attention,
random). Importing this package registers every method by name for m2ib.attributor.get_method:
saliency, grad_x_input, integrated_gradients, gradcam, rise, occlusion, kernel_shap,
raw_attention, rollout, chefer, random. All explain the pair's cosine similarity (see _common)."""
from baselines import attention, gradient, perturbation, random_map  # noqa: F401  (registration)

NAMES = ("saliency", "grad_x_input", "integrated_gradients", "gradcam", "rise", "occlusion", "kernel_shap",
         "raw_attention", "rollout", "chefer", "random")
