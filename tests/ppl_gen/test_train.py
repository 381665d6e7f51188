"""The runner's training step against Pyro's own SVI: same ELBO, same updates."""


import pyro
import pyro.infer
import pyro.optim
import pytest
import torch

from ppl_gen.datasets.images import load_digits
from ppl_gen.core.train import BatchSchedule, Trainer, evaluate_elbo, make_elbo
from ppl_gen.core.errors import UserError


def _vae(latent_dim=4, hidden_dim=32):
    from models import vae as mod

    x = load_digits().train[:256]
    return mod, mod.VAE(x.shape[1], mod.Options(latent_dim=latent_dim, hidden_dim=hidden_dim)), x


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("elbo, fused", [("trace", False), ("meanfield", False), ("trace", True)])
def test_trainer_matches_pyro_svi(elbo, fused):
    """torch.optim.Adam over the param store (the runner's path, validation off after step 1)
    reproduces pyro.infer.SVI + pyro.optim.Adam (validation on) to float precision; so does the
    runner's default VAE step, the amortized guide's written-out ELBO (Guide.loss) after step 1."""
    steps, lr = 25, 1e-2
    _, vae, x = _vae()
    init = {k: v.detach().clone() for k, v in
            {**{"e" + k: v for k, v in vae.encoder.state_dict().items()},
             **{"d" + k: v for k, v in vae.decoder.state_dict().items()}}.items()}

    pyro.set_rng_seed(1)
    svi = pyro.infer.SVI(vae.model, vae.amortized, pyro.optim.Adam({"lr": lr}), make_elbo(elbo))
    svi_losses = [svi.step(x) for _ in range(steps)]
    svi_params = _params()

    pyro.clear_param_store()
    with torch.no_grad():  # restart from the very same initial weights
        for k, v in vae.encoder.state_dict().items():
            v.copy_(init["e" + k])
        for k, v in vae.decoder.state_dict().items():
            v.copy_(init["d" + k])
    pyro.set_rng_seed(1)
    trainer = Trainer(vae.model, vae.amortized, x, make_elbo(elbo), lr=lr,
                      fused_loss=vae.guides()["amortized"].loss if fused else None)
    ours = [trainer.step(t) * len(x) for t in range(1, steps + 1)]
    for a, b in zip(svi_losses, ours):
        assert abs(a - b) <= 1e-4 * abs(a)
    for k, v in _params().items():
        torch.testing.assert_close(v, svi_params[k], rtol=1e-4, atol=1e-5)


def _mean_and_se(values):
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def test_jit_elbo_estimates_the_same_elbo():
    """JIT tracing draws its random numbers in another order, so single estimates differ;
    at the same parameters both must estimate the same ELBO (means within 4 standard errors)."""
    _, vae, x = _vae()
    x = x[:64]
    plain, jit = make_elbo("trace"), make_elbo("trace", jit=True)
    with torch.no_grad():
        a = [plain.differentiable_loss(vae.model, vae.amortized, x).item() for _ in range(300)]
        b = [jit.differentiable_loss(vae.model, vae.amortized, x).item() for _ in range(300)]
    (ma, sa), (mb, sb) = _mean_and_se(a), _mean_and_se(b)
    assert abs(ma - mb) < 4 * (sa**2 + sb**2) ** 0.5, (ma, mb, sa, sb)


def test_batch_schedule_is_a_function_of_the_step():
    s1, s2 = BatchSchedule(100, 30, 7, torch.device("cpu")), BatchSchedule(100, 30, 7, torch.device("cpu"))
    first = [s1(t) for t in range(1, 8)]
    assert torch.equal(s2(5), first[4])  # asked out of order, same rows
    epoch = torch.cat(first[:3])  # 3 batches of 30 per epoch; the ragged 10 are dropped
    assert len(set(epoch.tolist())) == 90
    assert BatchSchedule(100, None, 0, torch.device("cpu"))(1) is None


def test_evaluate_elbo_in_chunks_equals_one_pass():
    """Chunked evaluation weighs each chunk's unbiased full-data estimate by n_c / N:
    with analytic KL and the likelihood exact given z-means it matches the one-pass value."""
    _, vae, x = _vae()
    one = evaluate_elbo(vae.model, vae.amortized, x, "meanfield", num_particles=200, chunk_size=10_000)
    chunked = evaluate_elbo(vae.model, vae.amortized, x, "meanfield", num_particles=200, chunk_size=50)
    assert abs(one - chunked) < 0.05 * abs(one) / 10  # 0.5% of the value: MC noise of 200 particles


def test_full_batch_models_refuse_minibatches():
    def model(x):
        pass

    with pytest.raises(UserError, match="--batch-size"):
        Trainer(model, model, torch.zeros(10), make_elbo("trace"), lr=0.1, batch_size=3)


def test_a_parameter_with_its_own_rate_moves_by_that_rate():
    """Adam's first step moves every coordinate by exactly its rate, against the gradient's
    sign (Kingma & Ba 2015: the bias-corrected m / sqrt(v) is sign(g)): a parameter named in
    param_lr by its own rate, the others by lr; a reloaded state keeps both rates."""
    from ppl_gen.core.train import Optimizers

    named = {"a": torch.zeros(3, requires_grad=True), "b": torch.zeros(2, requires_grad=True)}
    opt = Optimizers(lr=0.01, param_lr={"a": 0.1})
    opt.add(["a", "b"], named)
    (named["a"].sum() - named["b"].sum()).backward()
    opt.step()
    torch.testing.assert_close(named["a"].detach(), torch.full((3,), -0.1), rtol=0, atol=1e-6)
    torch.testing.assert_close(named["b"].detach(), torch.full((2,), 0.01), rtol=0, atol=1e-6)
    again = Optimizers(lr=0.01, param_lr={"a": 0.1})
    again.load_state_dict(opt.state_dict(), named)
    assert sorted(g["lr"] for g in again.param_groups) == [0.01, 0.1]


def test_checkpoints_keep_module_buffers():
    """BatchNorm running statistics are buffers, not parameters: Pyro's store does not hold
    them, so the Trainer saves the modules named in ``buffers`` and restores them exactly."""
    import pyro.distributions as dist

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    bn = torch.nn.BatchNorm1d(3)
    bn(torch.randn(8, 3) * 2 + 5)          # running statistics move away from (0, 1)
    saved_mean, saved_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(5)
    trainer = Trainer(model, guide, x, make_elbo("trace"), lr=0.01, buffers={"bn": bn})
    trainer.step(1)
    state = trainer.state_dict(1)
    bn.reset_running_stats()
    Trainer(model, guide, x, make_elbo("trace"), lr=0.01, buffers={"bn": bn}).load_state_dict(state)
    torch.testing.assert_close(bn.running_mean, saved_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, saved_var, rtol=0, atol=0)
    assert not torch.equal(saved_mean, torch.zeros(3))
