"""The specification of sida, as tests: pytest (about 6 minutes on 2 CPU cores, no GPU, no downloads).

In this file's order: networks.py (official numerics and names, safe loading, saving, precision); sida.py
(the losses, EDM's augmentation, the loop, data and latents, distributed runs, resume, faults, errors) and
bench.py; fid.py (statistics, datasets, the command line, generator evaluation, the toy's metrics); the
launch scripts (published settings, downloads, data checks, usage).

Golden fixtures (tiny networks made with the official EDM/EDM2 code) are in tests_data/ (or $SIDA_FIXTURES).
The real Inception detector, official checkpoints and datasets are replaced by stand-ins the tests build.
"""

import argparse
import errno
import functools
import http.server
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import PIL.Image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = Path(HERE)

if os.environ.get('PYTEST_XDIST_WORKER'):     # a worker of pytest.ini's -n: one CPU thread, in this process and
    os.environ['OMP_NUM_THREADS'] = '1'         # in the programs its tests start
    torch.set_num_threads(1)

import bench
import fid
import networks
import sida
import toy
from toy import curves
from networks import UserError  # noqa: E402
from toy import make
from toy import sweep


# ===================================================================================================
# networks.py: official numerics and names, safe loading, saving, precision
# ===================================================================================================

FIXTURE_DIRS = [os.environ.get('SIDA_FIXTURES', ''), os.path.join(HERE, 'tests_data'),
                os.path.join(HERE, '..', 'shared', 'fixtures')]
FIXTURES = ['edm_ddpmpp_uncond', 'edm_ncsnpp_cond', 'edm_adm_cond', 'edm2_cond']


def fixture_path(name):
    for directory in FIXTURE_DIRS:
        if directory and os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    pytest.skip(f'fixture {name} not found')


@functools.lru_cache(maxsize=None)
def golden(name):
    return torch.load(fixture_path(f'{name}.pt'), weights_only=True)


@functools.lru_cache(maxsize=None)
def manifests():
    with open(fixture_path('official_manifests.json')) as f:
        return json.load(f)


def our_class(fixture):
    return networks.EDM2Precond if fixture['official_class'].endswith('networks_edm2.Precond') else networks.EDMPrecond


def golden_net(name):
    """Our network with the fixture's official constructor arguments and weights."""
    fixture = golden(name)
    net = our_class(fixture)(**fixture['kwargs'])
    net.load_state_dict(fixture['state_dict'], strict=True)
    return net.eval().requires_grad_(False)


def golden_inputs(name):
    fixture = golden(name)
    return fixture['x'], fixture['sigma'], fixture['class_labels'], fixture['augment_labels']


def max_diff(a, b):
    return (a - b).abs().max().item()

# ----------------------------------------------------------------------------------------------------
# Numerics against the official code.

@pytest.mark.parametrize('name', FIXTURES)
def test_denoised_matches_official(name):
    with torch.no_grad():
        denoised = golden_net(name)(*golden_inputs(name))
    assert denoised.dtype == torch.float32
    assert max_diff(denoised, golden(name)['denoised']) <= 1e-5


@pytest.mark.parametrize('name', FIXTURES)
def test_logits_from_full_pass_match_official(name):
    with torch.no_grad():
        denoised, logits = golden_net(name)(*golden_inputs(name), return_logits=True)
    assert logits.shape == golden(name)['logits'].shape
    assert max_diff(logits, golden(name)['logits']) <= 1e-5
    assert max_diff(denoised, golden(name)['denoised']) <= 1e-5


@pytest.mark.parametrize('name', FIXTURES)  # includes NCSN++'s residual encoder
def test_discriminate_runs_encoder_only_and_matches_official(name):
    net = golden_net(name)
    decoder = net.unet.dec if hasattr(net, 'unet') else net.model.dec
    for block in decoder.values():
        block.register_forward_pre_hook(lambda *_: pytest.fail('decoder ran'))
    with torch.no_grad():
        logits = net.discriminate(*golden_inputs(name))
    assert max_diff(logits, golden(name)['logits']) <= 1e-5


@pytest.mark.parametrize('name', FIXTURES)
def test_one_pass_denoises_some_samples_and_discriminates_all(name):
    """encoder_only=k: the last k samples pass the encoder alone (SiDA's real images in the fake score step);
    D(x) of the others and every sample's logits equal those of separate passes."""
    net, (x, sigma, labels, aug) = golden_net(name), golden_inputs(name)
    n, k = 2, x.shape[0] - 2
    with torch.no_grad():
        denoised, logits = net(x, sigma, labels, aug, return_logits=True, encoder_only=k)
    assert denoised.shape[0] == n and logits.shape[0] == n + k
    assert max_diff(denoised, golden(name)['denoised'][:n]) <= 1e-5
    assert max_diff(logits, golden(name)['logits']) <= 1e-5


@pytest.mark.parametrize('name', FIXTURES)
def test_a_full_pass_slices_nothing_that_its_backward_would_copy(name):
    """D(x) of the whole batch (every pass but the fake score step's SiDA pass) takes the encoder's features as
    they are: a slice of all of them would cost a zeroed copy of their gradient in every backward pass."""
    net, (x, sigma, labels, aug) = golden_net(name), golden_inputs(name)
    denoised, _ = net(x.clone().requires_grad_(True), sigma, labels, aug, return_logits=True)
    nodes, seen = [denoised.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes += [child for child, _ in node.next_functions]
    assert not [type(node).__name__ for node in seen if 'Slice' in type(node).__name__]


def test_frozen_edm2_layers_normalise_once_and_follow_weight_changes(monkeypatch):
    """networks.freeze: an EDM2 network keeps its normalised weights between passes (the same outputs) and
    normalises again after an in-place change; a pass that trains the network never uses the kept weights."""
    calls, original = [], networks.unit_weights
    monkeypatch.setattr(networks, 'unit_weights', lambda *a: calls.append(1) or original(*a))
    net = golden_net('edm2_cond')
    x, sigma, labels, _ = golden_inputs('edm2_cond')
    layer = next(m for m in net.modules() if isinstance(m, networks.MPConv))
    with torch.no_grad():
        want = net(x, sigma, labels)
        assert len(calls) == 1
        networks.freeze(net)
        assert torch.equal(net(x, sigma, labels), want) and torch.equal(net(x, sigma, labels), want)
        assert len(calls) == 2                           # once for both frozen passes
        layer.weight.mul_(2)                             # EDM2 normalises: the output stays, but recomputed
        net(x, sigma, labels)
        assert len(calls) == 3
    with torch.inference_mode():
        net(x, sigma, labels)
    x_grad = x.clone().requires_grad_(True)              # a copy kept in inference mode would fail here
    net(x_grad, sigma, labels).sum().backward()
    assert len(calls) == 5 and x_grad.grad is not None
    net.requires_grad_(True)
    net(x, sigma, labels).sum().backward()               # trained: normalised in the graph, gradients reach it
    assert len(calls) == 6 and layer.weight.grad is not None


def test_edm2_layers_normalised_together_equal_one_at_a_time():
    """unit_weights normalises the weights of equal fan-in as one stack: the outputs, input gradients and
    weight gradients of a training pass equal those of every layer normalising its own weight (upstream)."""
    torch.manual_seed(0)
    net = golden_net('edm2_cond').train().requires_grad_(True)
    x, sigma, labels, _ = golden_inputs('edm2_cond')
    results = []
    for together in (True, False):
        if not together:    # weights=None everywhere: each MPConv.normalized_weight, as upstream
            net.weights = lambda dtype: None
        x_grad = x.clone().requires_grad_(True)
        net.zero_grad()
        out = net(x_grad, sigma, labels)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, x_grad.grad] + [p.grad for p in net.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 40
    assert all(max_diff(a, b) <= 1e-5 * max(1, b.abs().max().item()) for a, b in zip(*results))


@pytest.mark.parametrize('name', [f for f in FIXTURES if not f.startswith('edm2')])
def test_parameters_cast_once_give_autocasts_outputs_and_gradients(name):
    """sida.cast_once: an EDM network called with all its parameters cast to bf16 by one operation gives, under
    bf16 autocast, the outputs and gradients of autocast's per-parameter casts, bit for bit; the cast keeps
    each parameter's memory layout, and a kept cast follows an in-place change of the parameters."""
    net = golden_net(name).train().requires_grad_(True).to(memory_format=torch.channels_last)
    x, sigma, labels, aug = golden_inputs(name)
    cast = networks.cast_parameters(net, torch.bfloat16)
    assert all(cast[n].dtype == torch.bfloat16 and cast[n].stride() == p.stride() and torch.equal(cast[n], p.bfloat16())
               for n, p in net.named_parameters())
    results = []
    for call in (net, sida.cast_once(net, net, torch.bfloat16)):
        net.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = call(x, sigma, labels, aug)
        out.float().square().sum().backward()
        results.append([out] + [p.grad for p in net.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 40 and all(torch.equal(a, b) for a, b in zip(*results))
    kept = sida.cast_once(networks.freeze(net), net, torch.bfloat16, keep=True)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(kept(x, sigma, labels, aug), net(x, sigma, labels, aug))
        next(net.parameters()).mul_(3)
        assert torch.equal(kept(x, sigma, labels, aug), net(x, sigma, labels, aug))


def test_edm2_logvar_matches_official():
    with torch.no_grad():
        denoised, logvar = golden_net('edm2_cond')(*golden_inputs('edm2_cond'), return_logvar=True)
        _, _, logvar_last = golden_net('edm2_cond')(*golden_inputs('edm2_cond'), return_logits=True, return_logvar=True)
    assert logvar.shape == (6, 1, 1, 1)
    assert max_diff(logvar, golden('edm2_cond')['logvar']) <= 1e-5
    assert torch.equal(logvar, logvar_last)


@pytest.mark.parametrize('name', ['edm2-img512-xs', 'edm2-img512-s', 'edm2-img512-m', 'edm2-img512-l', 'edm2-img512-xl',
                                  'edm2-img512-xxl', 'edm-cifar10-32x32-uncond-vp', 'edm-cifar10-32x32-cond-vp',
                                  'edm-ffhq-64x64-uncond-vp', 'edm-afhqv2-64x64-uncond-vp', 'edm-imagenet-64x64-cond-adm'])
def test_official_config_has_manifest_tensors_and_parameter_count(name):
    entry = manifests()[name]
    with torch.device('meta'):
        net = (networks.EDM2Precond if name.startswith('edm2') else networks.EDMPrecond)(**entry['kwargs'])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == entry['tensors']
    net.load_state_dict({k: torch.empty(s, device='meta') for k, s in entry['tensors'].items()}, strict=True, assign=True)
    assert sum(p.numel() for p in net.parameters()) == entry['num_params']


def test_official_urls_name_every_manifest_teacher():
    assert set(networks.OFFICIAL_URLS) == set(manifests())
    assert all(url.startswith('https://nvlabs-fi-cdn.nvidia.com/') and url.endswith('.pkl')
               for url in networks.OFFICIAL_URLS.values())

# ----------------------------------------------------------------------------------------------------
# Calling conventions.

def test_sigma_as_float_0d_vector_or_4d_gives_same_output():
    net = golden_net('edm_ddpmpp_uncond')
    x, _, _, aug = golden_inputs('edm_ddpmpp_uncond')
    with torch.no_grad():
        reference = net(x, torch.full([6], 2.5), augment_labels=aug)
        for sigma in [2.5, torch.tensor(2.5), torch.full([6, 1, 1, 1], 2.5)]:
            assert torch.allclose(net(x, sigma, augment_labels=aug), reference, atol=1e-6)


def test_missing_class_labels_mean_all_zero_labels():
    net = golden_net('edm_ncsnpp_cond')
    x, sigma, _, _ = golden_inputs('edm_ncsnpp_cond')
    with torch.no_grad():
        assert torch.equal(net(x, sigma), net(x, sigma, torch.zeros(6, 10)))


def test_channels_last_input_gives_same_output():
    for name in ['edm_ncsnpp_cond', 'edm2_cond']:
        net = golden_net(name)
        x, sigma, labels, aug = golden_inputs(name)
        with torch.no_grad():
            out = net(x.contiguous(memory_format=torch.channels_last), sigma, labels, aug)
        assert max_diff(out, golden(name)['denoised']) <= 1e-5


def test_gradient_reaches_the_input_of_a_frozen_network():
    net = golden_net('edm2_cond')
    x, sigma, labels, _ = golden_inputs('edm2_cond')
    x = x.clone().requires_grad_(True)
    denoised, logits = net(x, sigma, labels, return_logits=True)
    (denoised.square().sum() + logits.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize('name', ['edm_ddpmpp_uncond', 'edm2_cond'])
def test_bf16_autocast_runs_and_stays_close_to_fp32(name):
    net = golden_net(name)
    inputs = golden_inputs(name)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        denoised, logits = net(*inputs, return_logits=True)
        disc = net.discriminate(*inputs)
    with torch.no_grad():
        fp32 = net(*inputs)
    assert denoised.dtype == torch.float32 and torch.isfinite(denoised).all() and torch.isfinite(disc).all()
    assert max_diff(denoised, fp32) > 1e-4 * fp32.abs().max().item()        # it ran in bf16, not in fp32
    reference = golden(name)
    assert max_diff(denoised, reference['denoised']) <= 0.05 * reference['denoised'].abs().max().item()
    assert max_diff(logits, reference['logits']) <= 0.05 * reference['logits'].abs().max().item() + 0.05


def test_config_is_json_and_rebuilds_the_same_network():
    net = golden_net('edm_ncsnpp_cond')
    config = json.loads(json.dumps(net.config))
    copy = networks.build_network(config).eval()
    copy.load_state_dict(net.state_dict())
    x, sigma, labels, aug = golden_inputs('edm_ncsnpp_cond')
    with torch.no_grad():
        assert torch.equal(copy(x, sigma, labels, aug), net(x, sigma, labels, aug))


@pytest.mark.parametrize('name', ['edm_ddpmpp_uncond', 'edm2_cond'])
def test_dropout_is_set_by_rebuilding_from_config(name):
    net = golden_net(name)
    config = {'class_name': net.config['class_name'], 'kwargs': dict(net.config['kwargs'], dropout=0.5)}
    dropped = networks.build_network(config)
    dropped.load_state_dict(net.state_dict())
    x, sigma, labels, aug = golden_inputs(name)
    with torch.no_grad():
        dropped.eval()
        assert torch.equal(dropped(x, sigma, labels, aug), net(x, sigma, labels, aug))
        dropped.train()
        assert not torch.allclose(dropped(x, sigma, labels, aug), dropped(x, sigma, labels, aug))


def test_edm2_forward_never_changes_the_stored_weights():
    net = golden_net('edm2_cond')
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net(*golden_inputs('edm2_cond'))
        net.train()(*golden_inputs('edm2_cond'))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_edm2_normalize_weights_gives_unit_rms_per_output_channel_and_keeps_outputs():
    net = golden_net('edm2_cond')
    x, sigma, labels, _ = golden_inputs('edm2_cond')
    with torch.no_grad():
        before = net(x, sigma, labels)
    net.normalize_weights_()
    for layer in net.modules():
        if isinstance(layer, networks.MPConv):
            rms = layer.weight.flatten(1).square().mean(dim=1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(net(x, sigma, labels), before, atol=1e-2)  # the forward pass normalises anyway (up to eps)


# ----------------------------------------------------------------------------------------------------
# Saving and loading our own files.

def test_save_then_load_gives_identical_outputs_and_meta(tmp_path):
    for name in ['edm_ncsnpp_cond', 'edm2_cond']:
        net = golden_net(name)
        path = tmp_path / f'{name}.pt'
        networks.save_network(net, str(path), kimg=123, method='sida')
        loaded = networks.load_network(str(path))
        inputs = golden_inputs(name)
        with torch.no_grad():
            assert torch.equal(loaded(*inputs), net(*inputs))
        assert loaded.meta == {'kimg': 123, 'method': 'sida'}
        assert loaded.config == net.config


def test_saved_file_is_plain_data_for_weights_only_torch_load(tmp_path):
    path = tmp_path / 'net.pt'
    networks.save_network(golden_net('edm_adm_cond'), str(path), kimg=1)
    data = torch.load(path, weights_only=True)
    assert data['format'] == 'sida-network' and data['config']['class_name'] == 'EDMPrecond'
    assert os.listdir(tmp_path) == ['net.pt']  # the temporary file was renamed, nothing left behind


def test_loaded_network_is_in_eval_mode_without_gradients(tmp_path):
    path = tmp_path / 'net.pt'
    networks.save_network(golden_net('edm_adm_cond').train().requires_grad_(True), str(path))
    net = networks.load_network(str(path))
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_truncated_file_is_refused_naming_it(tmp_path):
    path = tmp_path / 'net.pt'
    networks.save_network(golden_net('edm_adm_cond'), str(path))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError) as error:
        networks.load_network(str(truncated))
    assert str(truncated) in str(error.value) and '\n' not in str(error.value)
    assert 'not a readable network file (truncated' in str(error.value) and 'pickle' not in str(error.value)


def test_garbage_file_is_refused_naming_it(tmp_path):
    path = tmp_path / 'garbage.pkl'
    path.write_bytes(b'this is not a network' * 10)
    with pytest.raises(UserError, match='garbage.pkl') as error:
        networks.load_network(str(path))
    assert '\n' not in str(error.value)


def test_missing_file_is_refused():
    with pytest.raises(UserError, match='not found'):
        networks.load_network('/nonexistent/teacher.pkl')

# ----------------------------------------------------------------------------------------------------
# Official pickles: built here in the official format (a pickled dict of persistent objects) with a stand-in torch_utils.persistence
# whose embedded source would leave a trace file if anything executed it.

@pytest.fixture
def official_format(monkeypatch, tmp_path):
    """A writer of official-format pickles and the path of the trace file that must never appear."""
    trace = tmp_path / 'module_src_ran'
    persistence = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('the loader must not call the real persistence module')
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Persistent:
        def __init__(self, class_name, state):
            self.meta = dict(type='class', version=6, class_name=class_name, state=state,
                             module_src=f'open({str(trace)!r}, "w").write("executed")\n')
        def __reduce__(self):
            # Like upstream: a fresh meta dict on every call, around the one state dict (the module's __dict__).
            return _reconstruct_persistent_obj, (dict(self.meta),)
        def _apply_forced_weight_normalization(self, module, args):
            raise AssertionError('the loader must not call a pickled hook')

    util = types.ModuleType('dnnlib.util')
    EasyDict = type('EasyDict', (dict,), {'__module__': 'dnnlib.util'})
    util.EasyDict = EasyDict
    for name, module in [('torch_utils', types.ModuleType('torch_utils')), ('torch_utils.persistence', persistence),
                         ('dnnlib', types.ModuleType('dnnlib')), ('dnnlib.util', util)]:
        monkeypatch.setitem(sys.modules, name, module)

    def as_pickled(module, skip=(), hooks=False):
        children = OrderedDict((k, as_pickled(v, skip, hooks)) for k, v in module._modules.items() if k not in skip)
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.Sequential)):
            container = type(module)()  # written as the torch class with NEWOBJ + BUILD, as upstream
            container.__dict__['_modules'] = children
            return container
        obj = Persistent(type(module).__name__, {
            'training': False, '_forward_pre_hooks': OrderedDict(), '_parameters': OrderedDict(module._parameters),
            '_buffers': OrderedDict(module._buffers), '_non_persistent_buffers_set': set(), '_modules': children,
            '_forward_hooks': OrderedDict()})
        if hooks and isinstance(module, networks.MPConv):   # EDM2 SiDA with force_normalization: a bound method
            obj.meta['state']['_forward_pre_hooks'][0] = obj._apply_forced_weight_normalization
        return obj

    def write(net, class_name, init_kwargs, path, skip=(), hooks=False):
        ema = as_pickled(net, skip, hooks)
        ema.meta['class_name'] = class_name
        ema.meta['state'].update(_init_args=(), _init_kwargs=EasyDict(init_kwargs))
        data = {'ema': ema, 'loss_fn': Persistent('EDMLoss', {'P_mean': np.float64(-1.2), 'P_std': np.float32(1.2)}),
                'augment_pipe': None, 'dataset_kwargs': EasyDict(path='data.zip', resolution=np.int64(16))}
        with open(path, 'wb') as f:
            pickle.dump(data, f)
        return path

    write.trace = trace
    return write


@pytest.mark.parametrize('name, class_name, model_type', [
    ('edm_ddpmpp_uncond', 'EDMPrecond', None),
    ('edm_ncsnpp_cond', 'EDMPrecond_EncoderDecoder', 'SongUNet_EncoderDecoder'),
    ('edm_adm_cond', 'EDMPrecond_EncoderDecoder', 'DhariwalUNet_EncoderDecoder'),
    ('edm2_cond', 'Precond', None),
    ('edm2_cond', 'EDM_2_Precond_EncoderDecoder', None),
])
def test_official_pickle_loads_without_running_its_source(official_format, tmp_path, name, class_name, model_type):
    kwargs = dict(golden(name)['kwargs'], use_fp16=False)
    if model_type:
        kwargs['model_type'] = model_type
    if class_name == 'EDM_2_Precond_EncoderDecoder':
        kwargs.update(force_normalization=True, use_gan=True)
    path = official_format(golden_net(name), class_name, kwargs, str(tmp_path / 'official.pkl'))
    net = networks.load_network(path)
    with torch.no_grad():
        outputs = net(*golden_inputs(name), return_logits=True)
    assert max_diff(outputs[0], golden(name)['denoised']) <= 1e-5
    assert max_diff(outputs[1], golden(name)['logits']) <= 1e-5
    assert net.meta == {} and not net.training
    assert not official_format.trace.exists()


def test_official_edm2_generator_pickle_has_no_logvar_head(official_format, tmp_path):
    kwargs = dict(golden('edm2_cond')['kwargs'], force_normalization=True, use_gan=False)
    path = official_format(golden_net('edm2_cond'), 'EDM_2_Precond_Generator', kwargs, str(tmp_path / 'G.pkl'),
                           skip=('logvar_fourier', 'logvar_linear'))
    net = networks.load_network(path)
    assert not net.use_logvar and not any(k.startswith('logvar') for k in net.state_dict())
    with torch.no_grad():
        assert max_diff(net(*golden_inputs('edm2_cond')), golden('edm2_cond')['denoised']) <= 1e-5
    assert not official_format.trace.exists()


def test_official_pickle_with_a_missing_tensor_is_refused_listing_it(official_format, tmp_path):
    net = golden_net('edm_adm_cond')
    del net.model.out_conv._parameters['bias']
    path = official_format(net, 'EDMPrecond', golden('edm_adm_cond')['kwargs'], str(tmp_path / 'broken.pkl'))
    with pytest.raises(UserError, match=r'missing model\.out_conv\.bias'):
        networks.load_network(path)


def test_official_pickle_with_an_unknown_class_is_refused(official_format, tmp_path):
    kwargs = golden('edm_adm_cond')['kwargs']
    path = official_format(golden_net('edm_adm_cond'), 'VEPrecond', kwargs, str(tmp_path / 've.pkl'))
    with pytest.raises(UserError, match='VEPrecond'):
        networks.load_network(path)


def test_official_pickle_with_arguments_shared_many_times_over_is_refused_at_once(official_format, tmp_path):
    """Pickle memoises a list shared many times: 30 levels of L = [L, L] are a few hundred bytes, and 2^30
    values once copied (this took minutes and gigabytes)."""
    shared = [1]
    for _ in range(30):
        shared = [shared, shared]
    kwargs = dict(golden('edm_adm_cond')['kwargs'], extra=shared)
    path = official_format(golden_net('edm_adm_cond'), 'EDMPrecond', kwargs, str(tmp_path / 'shared.pkl'))
    start = time.time()
    with pytest.raises(UserError, match='network arguments of more than 10000 values'):
        networks.load_network(path)
    assert time.time() - start < 10


# ----------------------------------------------------------------------------------------------------
# Released generators: EDM2 SiDA pickles with forward pre-hooks, and the names of every release.

def test_the_official_format_fixture_pickles_hooks_as_upstream_does(official_format, tmp_path):
    """A check of the fixture (the loader's test is test_edm2_sida_pickle_with_forward_pre_hooks...): it writes
    the shape upstream's pickles have, by real pickle: getattr(<the MPConv being rebuilt>, name), the outer
    reconstruction of that MPConv thrown away for the inner one (POP, then a memo get)."""
    import pickletools
    kwargs = dict(golden('edm2_cond')['kwargs'], force_normalization=True, use_gan=True)
    path = official_format(golden_net('edm2_cond'), 'EDM_2_Precond_Generator', kwargs, str(tmp_path / 'G.pkl'),
                           skip=('logvar_fourier', 'logvar_linear'), hooks=True)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(open(path, 'rb').read())]
    strings = [arg for name, arg in ops if name in ('SHORT_BINUNICODE', 'BINUNICODE')]
    hooked = sum(isinstance(m, networks.MPConv) for name, m in golden_net('edm2_cond').named_modules()
                 if not name.startswith('logvar'))
    assert strings.count('getattr') == 1 and strings.count('_apply_forced_weight_normalization') == 1  # memoised
    assert sum(name == 'POP' for name, _ in ops) == hooked


@pytest.mark.parametrize('class_name', ['EDM_2_Precond_Generator', 'EDM_2_Precond_EncoderDecoder'])
def test_edm2_sida_pickle_with_forward_pre_hooks_loads_and_matches_official(official_format, tmp_path, class_name):
    kwargs = dict(golden('edm2_cond')['kwargs'], force_normalization=True, use_gan=True)
    skip = ('logvar_fourier', 'logvar_linear') if class_name == 'EDM_2_Precond_Generator' else ()
    path = official_format(golden_net('edm2_cond'), class_name, kwargs, str(tmp_path / 'G.pkl'), skip=skip, hooks=True)
    net = networks.load_network(path)
    with torch.no_grad():
        denoised, logits = net(*golden_inputs('edm2_cond'), return_logits=True)
    assert max_diff(denoised, golden('edm2_cond')['denoised']) <= 1e-5
    assert max_diff(logits, golden('edm2_cond')['logits']) <= 1e-5
    assert not any(m._forward_pre_hooks for m in net.modules())          # the hooks are dropped
    assert net.use_logvar == (class_name == 'EDM_2_Precond_EncoderDecoder')
    assert not official_format.trace.exists()


class _GetattrOf:
    """Pickles as builtins.getattr(target, name), the way pickle writes a bound method."""
    def __init__(self, target, name):
        self.target, self.name = target, name
    def __reduce__(self):
        return getattr, (self.target, self.name)


@pytest.mark.parametrize('target, name', [
    ({'a': 1}, 'clear'),                                  # a plain dict
    (OrderedDict, 'fromkeys'),                            # an allowed global, not a rebuilt object
    (nn.ModuleList(), 'append'),                          # a rebuilt torch container, not a persistent object
    ('text', 'format'),
])
def test_getattr_on_anything_but_a_rebuilt_persistent_object_is_refused(tmp_path, target, name):
    path = tmp_path / 'hostile.pkl'
    path.write_bytes(pickle.dumps({'ema': _GetattrOf(target, name)}))
    with pytest.raises(UserError) as error:
        networks.load_network(str(path))
    message = str(error.value)
    assert 'refusing to load' in message and 'builtins.getattr' in message and str(path) in message
    assert '\n' not in message


class _HookOwner:
    """A persistent object pickled like upstream's, whose forward pre-hook is make_hook(self)."""
    def __init__(self, make_hook):
        self.state = {'_parameters': OrderedDict(), '_modules': OrderedDict(),
                      '_forward_pre_hooks': OrderedDict({0: make_hook(self)})}
    def __reduce__(self):
        persistence = sys.modules['torch_utils.persistence']
        return persistence._reconstruct_persistent_obj, (dict(class_name='MPConv', state=self.state),)


@pytest.mark.parametrize('make_hook', [
    lambda owner: _GetattrOf(owner, 7),                                     # not an attribute name
    lambda owner: _GetattrOf(_GetattrOf(owner, '__class__'), '__init__'),   # getattr of a placeholder
], ids=['non-string name', 'chained getattr'])
def test_getattr_of_a_rebuilt_object_needs_a_string_name_and_no_chaining(official_format, tmp_path, make_hook):
    path = tmp_path / 'bad-hook.pkl'
    path.write_bytes(pickle.dumps({'ema': _HookOwner(make_hook)}))
    with pytest.raises(UserError, match='refusing to load .*builtins.getattr'):
        networks.load_network(str(path))
    assert not official_format.trace.exists()


# ----------------------------------------------------------------------------------------------------
# Hostile files: refused with one line, nothing executed.

class _SystemCall:
    def __init__(self, trace):
        self.trace = trace
    def __reduce__(self):
        return os.system, (f'touch {self.trace}',)


class _Eval:
    def __init__(self, trace):
        self.trace = trace
    def __reduce__(self):
        return eval, (f'open({str(self.trace)!r}, "w")',)


@pytest.mark.parametrize('payload, global_name', [(_SystemCall, os.system.__module__ + '.system'), (_Eval, 'builtins.eval')])
def test_pickle_calling_code_is_refused(tmp_path, payload, global_name):
    trace = tmp_path / 'executed'
    path = tmp_path / 'hostile.pkl'
    path.write_bytes(pickle.dumps({'ema': payload(trace)}))
    with pytest.raises(UserError) as error:
        networks.load_network(str(path))
    message = str(error.value)
    assert global_name in message and str(path) in message and '\n' not in message
    assert not trace.exists()


@pytest.mark.parametrize('payload', [_SystemCall, _Eval])
def test_torch_save_file_with_hostile_object_is_refused(tmp_path, payload):
    trace = tmp_path / 'executed'
    path = tmp_path / 'hostile.pt'
    net = golden_net('edm_adm_cond')
    torch.save({'format': 'sida-network', 'config': net.config, 'state_dict': net.state_dict(),
                'meta': {'note': payload(trace)}}, path)
    with pytest.raises(UserError, match='refusing to load') as error:
        networks.load_network(str(path))
    assert str(path) in str(error.value) and '\n' not in str(error.value)
    assert not trace.exists()


def test_safe_pickle_load_reads_numpy_pickles_with_named_globals(tmp_path):
    path = tmp_path / 'refs.pkl'
    path.write_bytes(pickle.dumps({'fid': {'mu': np.arange(3.0), 'sigma': np.eye(3)}}))
    core = 'numpy._core' if hasattr(np, '_core') else 'numpy.core'
    allowed = {f'{core}.multiarray._reconstruct', f'{core}.multiarray.scalar', 'numpy.ndarray', 'numpy.dtype'}
    data = networks.safe_pickle_load(str(path), allowed)
    assert np.array_equal(data['fid']['sigma'], np.eye(3))
    with pytest.raises(UserError, match='numpy.ndarray'):
        networks.safe_pickle_load(str(path), allowed - {'numpy.ndarray'})

# ----------------------------------------------------------------------------------------------------
# Downloads.

def test_open_url_on_a_missing_path_raises_user_error():
    with pytest.raises(UserError, match='not found'):
        networks.open_url('/nonexistent/file.pkl')


def test_open_url_on_an_unreachable_url_raises_user_error(tmp_path):
    with pytest.raises(UserError, match='could not reach http://127.0.0.1:9/x.*local file') as error:
        networks.open_url('http://127.0.0.1:9/x', cache_dir=str(tmp_path))
    assert '\n' not in str(error.value)
    assert os.listdir(tmp_path) == []  # no partial download left


def test_open_url_downloads_once_into_the_cache(tmp_path, capfd):
    (tmp_path / 'served').mkdir()
    (tmp_path / 'served' / 'net.pkl').write_bytes(b'x' * 1000)
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(QuietHandler, directory=str(tmp_path / 'served'))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/net.pkl'
    try:
        path = networks.open_url(url, cache_dir=str(tmp_path / 'cache'))
    finally:
        server.shutdown()
        server.server_close()
    assert open(path, 'rb').read() == b'x' * 1000
    assert 'downloading' in capfd.readouterr().err
    assert networks.open_url(url, cache_dir=str(tmp_path / 'cache')) == path  # server gone: served from the cache
    assert os.listdir(tmp_path / 'cache') == [os.path.basename(path)]

def test_a_cache_that_cannot_be_written_is_named_in_one_line(tmp_path):
    (tmp_path / 'net.pkl').write_bytes(b'x')
    (tmp_path / 'not-a-folder').write_text('mine')
    with pytest.raises(UserError) as error:
        networks.open_url((tmp_path / 'net.pkl').as_uri(), cache_dir=str(tmp_path / 'not-a-folder'))
    assert 'SIDA_CACHE' in str(error.value) and '\n' not in str(error.value)
    assert (tmp_path / 'not-a-folder').read_text() == 'mine'

# ----------------------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@cuda
@pytest.mark.parametrize('name', FIXTURES)
def test_cuda_fp32_matches_official(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    net = golden_net(name).cuda()
    inputs = [t if t is None else t.cuda() for t in golden_inputs(name)]
    with torch.no_grad():
        denoised, logits = net(*inputs, return_logits=True)
        disc = net.discriminate(*inputs)
    assert max_diff(denoised.cpu(), golden(name)['denoised']) <= 1e-5
    assert max_diff(logits.cpu(), golden(name)['logits']) <= 1e-5
    assert max_diff(disc.cpu(), golden(name)['logits']) <= 1e-5


@cuda
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', FIXTURES)
def test_cuda_autocast_channels_last_stays_close_to_fp32(name, dtype):
    net = golden_net(name).cuda()
    inputs = [t if t is None else t.cuda() for t in golden_inputs(name)]
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
        denoised, logits = net(*inputs, return_logits=True)
    reference = golden(name)
    assert denoised.dtype == torch.float32
    assert max_diff(denoised.cpu(), reference['denoised']) <= 0.05 * reference['denoised'].abs().max().item()
    assert max_diff(logits.cpu(), reference['logits']) <= 0.05 * reference['logits'].abs().max().item() + 0.05


# ===================================================================================================
# sida.py: the losses, the loop, distributed runs, resume, errors; bench.py
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# The losses equal the papers' formulas on pinned draws (independent numpy re-statements).

def _np(t):
    return t.detach().double().numpy()


def _bce(logit, target):
    return np.maximum(logit, 0) - logit * target + np.log1p(np.exp(-np.abs(logit)))


@pytest.fixture
def draws():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(x_g=r(4, 3, 8, 8), d_real=r(4, 3, 8, 8), d_fake=r(4, 3, 8, 8), logit_a=r(4, 1, 2, 2) * 3,
                logit_b=r(4, 1, 2, 2) * 3, sigma=torch.rand(4, 1, 1, 1, generator=g) * 5 + 0.01)


def test_sid_sigma_maps_t_onto_the_karras_schedule():
    t = torch.tensor([0.0, 0.4, 0.8])
    expect = [(80 ** (1 / 7) + (1 - v) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for v in t.tolist()]
    assert torch.allclose(sida.sid_sigma(t), torch.tensor(expect), rtol=1e-5)
    assert abs(sida.sid_sigma(torch.tensor(0.0)).item() - 0.002) < 1e-7
    assert 24.0 < sida.sid_sigma(torch.tensor(0.8)).item() < 25.0


def test_sid_loss_equals_the_formula(draws):
    draws['x_g'][3] = draws['d_real'][3]                # w = 0 there: the floor 1e-5 applies
    x, dr, df = _np(draws['x_g']), _np(draws['d_real']), _np(draws['d_fake'])
    alpha = 1.2
    w = np.maximum(np.abs(x - dr).mean(axis=(1, 2, 3), keepdims=True), 1e-5)
    expect = (dr - df) * ((dr - x) - alpha * (dr - df)) / w
    got = sida.sid_loss(draws['x_g'], draws['d_real'], draws['d_fake'], alpha)
    np.testing.assert_allclose(_np(got), expect, rtol=1e-5, atol=1e-6)
    assert np.isfinite(_np(got)).all() and np.abs(_np(got[3])).max() > 1e3     # -alpha (dr - df)^2 / 1e-5


def test_sid_weight_carries_no_gradient(draws):
    x = draws['x_g'].clone().requires_grad_(True)
    d_real = draws['d_real']
    loss = sida.sid_loss(x, d_real, draws['d_fake'], 1.0).sum()
    loss.backward()
    w = (x.detach() - d_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expect = -(d_real - draws['d_fake']) / w             # d/dx of (dr - df)(dr - x)/w with w held fixed
    assert torch.allclose(x.grad, expect, atol=1e-5)


def test_denoising_loss_equals_edm_weighting(draws):
    s, sd = _np(draws['sigma']), 0.5
    expect = (s ** 2 + sd ** 2) / (s * sd) ** 2 * (_np(draws['d_fake']) - _np(draws['x_g'])) ** 2
    got = sida.denoising_loss(draws['d_fake'], draws['x_g'], draws['sigma'], sd)
    np.testing.assert_allclose(_np(got), expect, rtol=1e-5)


def test_denoising_loss_with_logvar_equals_edm2_form(draws):
    u = torch.linspace(-1, 1, 4).view(4, 1, 1, 1)
    base = _np(sida.denoising_loss(draws['d_fake'], draws['x_g'], draws['sigma'], 0.5))
    got = sida.denoising_loss(draws['d_fake'], draws['x_g'], draws['sigma'], 0.5, logvar=u)
    np.testing.assert_allclose(_np(got), base / np.exp(_np(u)) + _np(u), rtol=1e-5)


ALL = torch.ones(4, dtype=torch.bool)


def test_discriminator_loss_equals_the_formula(draws):
    lr, lf, s = _np(draws['logit_a']), _np(draws['logit_b']), _np(draws['sigma'])
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    expect = weight * (_bce(lr, 1).mean() + _bce(lf, 0).mean()) / 2
    got = sida.discriminator_loss(draws['logit_a'], draws['logit_b'], draws['sigma'], 0.5, ALL)
    np.testing.assert_allclose(_np(got), expect, rtol=1e-5)


def test_edm2_discriminator_loss_is_divided_by_exp_u_per_sample(draws):
    """EDM2 divides L_D, like L_psi, by e^u of the fake score network's log-variance, sample by sample."""
    lr, lf, s = _np(draws['logit_a']), _np(draws['logit_b']), _np(draws['sigma'])
    u = torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(4, 1, 1, 1)
    expect = (s ** 2 + 0.25) / (s * 0.5) ** 2 * (_bce(lr, 1).mean() + _bce(lf, 0).mean()) / 2 / np.exp(_np(u))
    got = sida.discriminator_loss(draws['logit_a'], draws['logit_b'], draws['sigma'], 0.5, ALL, logvar=u)
    np.testing.assert_allclose(_np(got), expect, rtol=1e-5)


def test_adversarial_loss_is_batch_mean_bce_divided_by_each_w(draws):
    draws['logit_a'][0, 0, 0, 0], draws['logit_a'][2, 0, 1, 1] = 25.0, -25.0     # clamped to +-10
    x, dr, logit = _np(draws['x_g']), _np(draws['d_real']), _np(draws['logit_a'])
    w = np.maximum(np.abs(x - dr).mean(axis=(1, 2, 3), keepdims=True), 1e-5)
    expect = np.broadcast_to(_bce(np.clip(logit, -10, 10), 1).mean() / w, x.shape)
    got = sida.adversarial_loss(draws['logit_a'], draws['x_g'], draws['d_real'], ALL)
    np.testing.assert_allclose(_np(got), expect, rtol=1e-5)


def test_generator_objective_combines_the_terms_half_and_half(draws):
    real = sida.Denoised(draws['d_real'], draws['logit_b'], None)
    fake = sida.Denoised(draws['d_fake'], draws['logit_a'], None)
    sid = sida.sid_loss(draws['x_g'], draws['d_real'], draws['d_fake'], 1.0).sum() / 4
    adv = sida.adversarial_loss(draws['logit_a'], draws['x_g'], draws['d_real'], ALL).sum() / 4
    loss, ok, _ = sida.generator_objective(draws['x_g'], real, fake, ALL, 1.0, 100.0, 0.01, False, batch=4)
    assert torch.allclose(loss, sid * 100.0) and ok.all()
    loss, _, stats = sida.generator_objective(draws['x_g'], real, fake, ALL, 1.0, 100.0, 0.01, True, batch=4)
    assert torch.allclose(loss, 0.5 * sid * 100.0 + 0.5 * adv * 0.01) and 'loss_adv' in stats
    # EDM2: both terms divided, sample by sample, by e^u of the fake score network's pass.
    u = torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(4, 1, 1, 1)
    fake = sida.Denoised(draws['d_fake'], draws['logit_a'], u)
    per = lambda t: t.sum(dim=(1, 2, 3)) / torch.exp(u.flatten())
    sid = per(sida.sid_loss(draws['x_g'], draws['d_real'], draws['d_fake'], 1.0)).sum() / 4
    adv = per(sida.adversarial_loss(draws['logit_a'], draws['x_g'], draws['d_real'], ALL)).sum() / 4
    loss, _, _ = sida.generator_objective(draws['x_g'], real, fake, ALL, 1.0, 100.0, 0.01, True, batch=4)
    assert torch.allclose(loss, 0.5 * sid * 100.0 + 0.5 * adv * 0.01)


def test_fake_score_objective_weighs_its_two_terms_by_ls_and_lsd(draws):
    """sum(L_psi) ls / B + sum(L_D) lsd / B, EDM2's e^u in both terms; SiD (no real logits): L_psi alone."""
    u = torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(4, 1, 1, 1)
    fake = sida.Denoised(draws['d_fake'], draws['logit_b'], u)
    x, d, s, lr, lf, uu = map(_np, (draws['x_g'], draws['d_fake'], draws['sigma'], draws['logit_a'], draws['logit_b'], u))
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    psi = (weight * (d - x) ** 2 / np.exp(uu) + uu).sum()
    disc = (weight * (_bce(lr, 1).mean() + _bce(lf, 0).mean()) / 2 / np.exp(uu)).sum()
    loss, ok, stats = sida.fake_score_objective(fake, draws['x_g'], draws['sigma'], 0.5, ALL, draws['logit_a'],
                                                3.0, 7.0, batch=4)
    np.testing.assert_allclose(loss.item(), (3 * psi + 7 * disc) / 4, rtol=1e-5)
    assert ok.all() and {'loss_fake_score', 'loss_disc'} <= set(stats)
    loss, _, stats = sida.fake_score_objective(fake, draws['x_g'], draws['sigma'], 0.5, ALL, None, 3.0, 7.0, batch=4)
    np.testing.assert_allclose(loss.item(), 3 * psi / 4, rtol=1e-5)
    assert 'loss_disc' not in stats


def test_nonfinite_samples_are_dropped_before_the_losses(draws):
    x = draws['x_g'].clone()
    x[1, 0, 0, 0] = float('nan')
    ok, (x_safe, d_real) = sida.drop_nonfinite(ALL, x, draws['d_real'])
    assert ok.tolist() == [True, False, True, True] and torch.isfinite(x_safe).all()
    adv = sida.adversarial_loss(draws['logit_a'], x_safe, d_real, ok)
    clean = sida.adversarial_loss(draws['logit_a'][ok], draws['x_g'][ok], draws['d_real'][ok], ALL[:3])
    assert torch.allclose(adv[ok], clean)


@pytest.mark.parametrize('clip', [False, True])
@pytest.mark.parametrize('chunk', [2**28, 17, 1])
def test_gradient_guard_equals_nan_to_num_per_tensor(clip, chunk):
    """The flat gradient guard changes every gradient as upstream's per-tensor nan_to_num (and clamp) does,
    in one flat copy or in several (chunk 17: the first gradient alone, then the next two; 1: one per tensor)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (5,), (2, 2, 3), (2,)]]
    grads = [torch.randn(p.shape) * 3 for p in params[:3]]
    grads[0][1, 2], grads[1][0], grads[2][1, 0, 2] = float('nan'), float('inf'), float('-inf')
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with bench.OpCounter() as ops:
        sida.sanitize_grads(params, clip, chunk)
    assert ops.count == {2**28: 1, 17: 2, 1: 3}[chunk] * (4 if clip else 3)      # cat, nan_to_num_, [clamp_,] copy
    for p, g in zip(params, grads):
        want = torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5)
        assert torch.equal(p.grad, want.clamp(-1, 1) if clip else want)
    assert params[3].grad is None                 # a parameter without a gradient keeps none


@pytest.mark.parametrize('step', ['generator', 'fake_score'])
def test_a_nan_network_output_drops_its_sample_and_keeps_the_step(tiny_teacher, step):
    """A NaN in one sample of a network output costs that sample only: the gradients stay finite and equal
    the gradients of the same batch without that sample (dropped by indexing, as upstream does)."""
    torch.manual_seed(0)
    teacher = networks.load_network(tiny_teacher)
    G = sida.trainable_copy(teacher, 0.0, torch.device('cpu')).eval()
    fake_score = sida.trainable_copy(teacher, 0.0, torch.device('cpu')).eval()
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(4, 3, 16, 16, generator=g), torch.eye(4)
    sigma, noise = torch.rand(4, 1, 1, 1, generator=g) * 3 + 0.1, torch.randn(4, 3, 16, 16, generator=g)
    x_real, aug = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.zeros(4, 9)

    def grads(keep, poison):
        trained = G if step == 'generator' else fake_score
        trained.zero_grad(set_to_none=True)
        n, s = len(keep), sigma[keep]
        if step == 'generator':
            x_g = G(2.5 * z[keep], 2.5, c[keep], aug[keep])
            x_t = x_g + s * noise[keep]
            real = sida.denoise(teacher, x_t, s, c[keep], aug[keep])
            fake = sida.denoise(fake_score, x_t, s, c[keep], aug[keep])
            if poison:
                real = real._replace(denoised=torch.where(torch.arange(n).view(-1, 1, 1, 1) == 1, float('nan'), real.denoised))
            loss, ok, _ = sida.generator_objective(x_g, real, fake, torch.ones(n, dtype=torch.bool), 1.0, 100.0, 0.01, True, 4)
        else:
            with torch.no_grad():
                x_g = G(2.5 * z[keep], 2.5, c[keep], aug[keep])
            fake = sida.denoise(fake_score, x_g + s * noise[keep], s, c[keep], aug[keep])
            if poison:
                fake = fake._replace(logits=torch.where(torch.arange(n).view(-1, 1, 1, 1) == 1, float('nan'), fake.logits))
            logit_real = fake_score.discriminate(x_real[keep] + s * noise[keep], s, c[keep], aug[keep])
            loss, ok, _ = sida.fake_score_objective(fake, x_g, s, 0.5, torch.ones(n, dtype=torch.bool), logit_real,
                                                    1.0, 1.0, 4)
        loss.backward()
        return [p.grad.clone() for p in trained.parameters() if p.grad is not None], ok

    poisoned, ok = grads([0, 1, 2, 3], poison=True)
    without, _ = grads([0, 2, 3], poison=False)
    assert ok.tolist() == [True, False, True, True]
    assert len(poisoned) == len(without) > 0
    for a, b in zip(poisoned, without):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Augmentation: EDM's pipeline, its label convention and its draws.

def edm_augment_fixture():
    return torch.load(fixture_path('edm_augment.pt'), weights_only=True)


def label_draws(p, batch=40_000, seed=0):
    """The labels of `batch` samples of networks.augment at probability p (on 1x1 images: only labels matter)."""
    return networks.augment(torch.zeros(batch, 1, 1, 1), p, torch.Generator().manual_seed(seed))[1]


def test_augment_reproduces_edm_on_given_parameters():
    fixture = edm_augment_fixture()
    out, labels = networks.apply_augment(fixture['x'], fixture['params'])
    assert max_diff(labels, fixture['labels']) <= 1e-5
    assert max_diff(out, fixture['out']) <= 1e-5


@cuda
def test_augment_on_cuda_reproduces_edm(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    fixture = edm_augment_fixture()
    out, labels = networks.apply_augment(fixture['x'].cuda(), {k: v.cuda() for k, v in fixture['params'].items()})
    assert max_diff(labels.cpu(), fixture['labels']) <= 1e-5
    assert max_diff(out.cpu(), fixture['out']) <= 1e-5


def test_augment_compiles_whole_and_matches_eager():
    fixture = edm_augment_fixture()
    compiled = torch.compile(networks.apply_augment, fullgraph=True, backend='aot_eager')   # fullgraph: a break raises
    try:
        out, labels = compiled(fixture['x'], fixture['params'])
    finally:
        torch._dynamo.reset()
    eager_out, eager_labels = networks.apply_augment(fixture['x'], fixture['params'])
    assert max_diff(out, eager_out) <= 1e-6 and torch.equal(labels, eager_labels)


def test_augment_at_p0_only_flips_horizontally_and_exactly():
    x = torch.randn(64, 3, 8, 8)
    y, labels = networks.augment(x, 0.0, torch.Generator().manual_seed(0))
    assert labels.shape == (64, 9)
    assert (labels[:, 1:] == 0).all()
    flipped = labels[:, 0] == 1
    assert 10 < flipped.sum() < 54
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])


def test_augment_draws_each_transform_with_probability_p_and_the_xflip_always():
    p = 0.12
    labels = label_draws(p)
    xflip, yflip, scale, rotation, aniso = (labels[:, [0, 1, 2, 4, 5]] != 0).float().mean(0)
    translation = (labels[:, 7:] != 0).any(1).float().mean()   # the pair is one transform
    assert abs(xflip - 0.5) < 0.01 and abs(yflip - p / 2) < 0.01       # flips: a fair bit when drawn
    for fraction in (scale, rotation, aniso, translation):
        assert abs(fraction - p) < 0.01


def test_augment_translates_x_and_y_together():
    labels = label_draws(0.12)
    tx, ty = labels[:, 7] != 0, labels[:, 8] != 0
    assert tx.sum() > 1000 and torch.equal(tx, ty)


def test_augment_scale_and_translation_labels_are_the_raw_normal_draws():
    labels = label_draws(1.0)
    for column in (2, 7, 8):                                  # scale_w, tx, ty ~ N(0, 1), not 0.2 w or 0.125 w
        assert abs(labels[:, column].std() - 1) < 0.03 and abs(labels[:, column].mean()) < 0.03


def test_augment_anisotropy_label_is_the_raw_draw_in_a_frame_rotated_half_of_the_time():
    labels = label_draws(1.0)
    w_cos, w_sin = labels[:, 5], labels[:, 6]
    assert abs((w_cos ** 2 + w_sin ** 2).mean() - 1) < 0.03    # |w| from w ~ N(0, 1)
    assert abs((w_sin != 0).float().mean() - 0.5) < 0.01


def test_augment_translation_moves_content_by_an_eighth_of_the_size_per_unit_on_non_square_images():
    x = torch.randn(2, 3, 24, 40)
    zero = torch.zeros(2)
    params = dict(xflip=zero, yflip=zero, scale_w=zero, rot=zero, aniso_w=zero, aniso_r=zero,
                  tx=torch.tensor([1.0, -0.4]), ty=torch.tensor([1.0, 2.0]))   # (5, 3) and (-2, 6) pixels
    y, _ = networks.apply_augment(x, params)
    assert max_diff(y[0, :, 3:, 5:], x[0, :, :-3, :-5]) <= 1e-4     # whole-pixel shifts: only rounding
    assert max_diff(y[1, :, 6:, :-2], x[1, :, :-6, 2:]) <= 1e-4


@pytest.mark.parametrize('ema, rampup', [(0.5, 0.05), (0.02, 0.25)])     # the paper's runs; the toy's
def test_ema_follows_the_half_life_rule(ema, rampup):
    """Half-life `ema` Mimg, and at most `ema_rampup` of the images seen (EDM's ramp-up): the toy averages
    over the last quarter of its images, so its reported generator does not hang on one snapshot."""
    s = sida.SiDA.__new__(sida.SiDA)
    s.args = types.SimpleNamespace(ema=ema, ema_rampup=rampup, batch=256)
    s.G, s.G_ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for nimg in (1000, 10_000_000):
        s.G.weight.data.fill_(1.0)
        s.G_ema.weight.data.fill_(0.0)
        s.update_ema(nimg)
        halflife = min(ema * 1e6, nimg * rampup)
        assert abs(s.G_ema.weight.item() - (1 - 0.5 ** (256 / halflife))) < 1e-6
    assert sida.parse_args([]).ema_rampup == 0.05 and sida.parse_args(['--preset', 'toy']).ema_rampup == 0.25

# ---------------------------------------------------------------------------------------------------
# The loop on tiny networks.

TINY = {'class_name': 'EDMPrecond', 'kwargs': dict(img_resolution=16, img_channels=3, label_dim=4,
        model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
        augment_dim=9, dropout=0.0)}


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    net = networks.build_network(TINY)
    path = str(tmp_path_factory.mktemp('teacher') / 'teacher.pt')
    networks.save_network(net, path)
    return path


def tiny_run_argv(tmp, teacher, *extra):
    return ['--teacher', teacher, '--data', 'toy', '--cond', '--batch', '8', '--lr', '1e-4', '--glr', '1e-4',
            '--ema', '0.0005', '--dropout', '0', '--augment', '0.1', '--gen-start-kimg', '0.016',
            '--adv-start-kimg', '0.032', '--tick', '0.016', '--snap', '100', '--dump', '100', '--metrics', 'none',
            '--device', 'cpu', *([] if '--resume' in extra else ['--outdir', str(tmp)]), *extra]


def run_sida(tmp, teacher, *extra, check=True, env=None, nproc=None, kill_at=None):
    """A tiny toy run in a subprocess; kill_at=(point, n): SIGKILLed at the nth call of a point (kill_at, below)."""
    cmd = [sys.executable, os.path.join(HERE, 'sida.py'), *tiny_run_argv(tmp, teacher, *extra)]
    if nproc:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] + cmd[1:]
    if kill_at:
        cmd = [sys.executable, '-c', 'import sys, test_sida; test_sida.kill_at(sys.argv[1], int(sys.argv[2]), sys.argv[3:])',
               kill_at[0], str(kill_at[1])] + cmd[2:]
    e = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300, cwd=HERE)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_teacher_gets_no_gradient_but_passes_it_to_the_generator(tiny_teacher):
    teacher = networks.load_network(tiny_teacher).requires_grad_(True)    # frozen by SiDA, not by the loader
    images, labels = toy.images(32, seed=0)
    sampler = sida.Sampler(images, labels, 4, (3, 16, 16), torch.device('cpu'))
    args = sida.parse_args(['--batch', '4', '--dropout', '0', '--device', 'cpu'])
    grads = []

    def G_grads(cut_teacher_input):
        torch.manual_seed(0)
        s = sida.SiDA(args, teacher, teacher, sampler, 1, 4, torch.device('cpu'))
        with torch.no_grad():                        # f_psi unlike the teacher, so the SiD term has a gradient
            for p in s.fake_score.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        if cut_teacher_input:
            teacher_fn = s.teacher_fn
            s.teacher_fn = lambda x, *a, **k: teacher_fn(x.detach(), *a, **k)
        fake_before = [p.detach().clone() for p in s.fake_score.parameters()]
        s.optimizer_step = lambda opt, scaler, net, clip: grads.append([p.grad.clone() for p in net.parameters()])
        s.generator_step([sida.Slot(0, 0, torch.device('cpu'))], use_adv=False)
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is None for p in s.fake_score.parameters())
        assert all(torch.equal(a, p) for a, p in zip(fake_before, s.fake_score.parameters()))
        return grads[-1]

    through, cut = G_grads(False), G_grads(True)
    assert any(g.abs().sum() > 0 for g in through), 'the generator gets a gradient'
    assert not all(torch.allclose(a, b) for a, b in zip(through, cut)), 'part of it comes through the teacher'


@pytest.mark.parametrize('precision', ['bf16'])
def test_losses_under_autocast_stay_within_tolerance_of_fp32(tiny_teacher, precision):
    """bf16 autocast (fp32 master weights, fp32 loss arithmetic): recorded losses within 5% of fp32."""
    teacher = networks.load_network(tiny_teacher)
    images, labels = toy.images(32, seed=0)
    stats = {}
    for p in ('fp32', precision):
        sampler = sida.Sampler(images, labels, 4, (3, 16, 16), torch.device('cpu'))
        args = sida.parse_args(['--batch', '8', '--dropout', '0', '--augment', '0', '--precision', p])
        s = sida.SiDA(args, teacher, teacher, sampler, 1, 8, torch.device('cpu'))
        s.fake_score_step([sida.Slot(0, 0, torch.device('cpu'))])
        s.generator_step([sida.Slot(1, 0, torch.device('cpu'))], use_adv=True)
        stats[p] = {k: float(v[0]) for k, v in s.stats.items() if k.startswith('loss')}
    for k, v in stats['fp32'].items():
        assert abs(stats[precision][k] - v) <= 0.05 * abs(v) + 1e-4, (k, v, stats[precision][k])
    assert stats[precision] != stats['fp32']                         # it did not run in fp32

def bench_sida(arch, *flags):
    """The benchmark's SiDA on a randomly initialised --arch network, 10 classes, 16x16, batch 2."""
    [(_, _, args)] = bench.parse_runs(['--device', 'cpu', '--arch', arch, '--resolution', '16', '--cbase', '16',
                                       '--cres', '1,2', '--label-dim', '10', '--batch-gpu', '2', '--dropout', '0',
                                       *flags], torch.device('cpu'))
    return bench.random_sida(args, 1, torch.device('cpu'))


@pytest.mark.parametrize('arch, precision', [('ddpmpp', 'bf16'), ('edm2', 'fp32')])
def test_a_network_unchanged_through_the_others_step_is_prepared_once_per_step(monkeypatch, arch, precision):
    """Over three accumulation rounds, G in the fake score step and f_psi in the generator step are cast to
    bf16 (EDM) or weight-normalised (EDM2) once, not in every round, and let go after the step; the networks
    after the iteration equal those of preparing them in every round."""
    prepare = 'unit_weights' if arch == 'edm2' else 'cast_parameters'
    calls, original = [], getattr(networks, prepare)
    monkeypatch.setattr(networks, prepare, lambda net, *a: calls.append(net) or original(net, *a))
    results = []
    for once in (True, False):
        s = bench_sida(arch, '--precision', precision)
        slots = [sida.Slot(i, 0, torch.device('cpu')) for i in range(3)]
        if not once:                                     # in every round
            monkeypatch.setattr(networks, 'keep_weights', lambda net, keep=True: net)
            if arch != 'edm2':
                s.G_eval_fn = sida.cast_once(s.G, s.G, torch.bfloat16)
                s.fake_fn = sida.cast_once(s.fake_score, s.fake_score, torch.bfloat16)
        calls.clear()
        s.fake_score_step(slots)
        assert (calls.count(s.G), calls.count(s.fake_score)) == ((1 if once else 3), 3)
        calls.clear()
        s.generator_step(slots, use_adv=True)
        assert (calls.count(s.G), calls.count(s.fake_score)) == (3, (1 if once else 3))
        results.append([t.clone() for net in (s.G, s.fake_score) for t in net.state_dict().values()])
        if once:                                         # let go: the next pass prepares anew
            assert not any(net.keeps_weights or net._kept for net in (s.G, s.fake_score) if arch == 'edm2')
            calls.clear()
            x = torch.zeros(2, s.G.img_channels, 16, 16)
            with torch.no_grad(), s.autocast():
                s.G_eval_fn(x, torch.ones(2), torch.eye(10)[:2])
                s.fake_fn(x, torch.ones(2), torch.eye(10)[:2])
            assert (calls.count(s.G), calls.count(s.fake_score)) == (1, 1)
    assert len(results[0]) > 40 and all(torch.equal(a, b) for a, b in zip(*results))


def test_a_step_that_fails_in_a_round_lets_the_kept_weights_go():
    """An error inside an accumulation round (out of memory, say; bench.py goes on to its next run) still lets
    the unchanged network's kept copy of its weights go, as the end of the rounds does."""
    s = bench_sida('edm2')
    dropped = []
    fn = lambda *args, **kwargs: None
    fn.drop = lambda: dropped.append(True)
    slots = [sida.Slot(i, 0, torch.device('cpu')) for i in range(2)]
    with pytest.raises(RuntimeError, match='out of memory'):
        for slot, sync in s.rounds(s.fake_score_ddp, slots, unchanged=(s.G, fn)):
            assert s.G.keeps_weights
            with torch.no_grad():
                s.G.weights(torch.float32)               # kept while the rounds last
            assert s.G._kept is not None
            raise RuntimeError('out of memory')
    assert not s.G.keeps_weights and s.G._kept is None and dropped == [True]


def test_noise_levels_of_the_two_steps_follow_p_mean_p_std_and_tmax():
    """The fake score step draws ln sigma ~ N(p_mean, p_std^2); the generator step sigma = sid_sigma(t) with
    t ~ U(0, tmax / 1000). Checked on 256 draws of each, against the flags, not against the code's formulas."""
    s = bench_sida('ddpmpp', '--batch-gpu', '256', '--tmax', '400', '--p-mean', '-0.5', '--p-std', '0.6')
    seen = {}

    def recording(name, fn):
        def call(x, sigma, *args, **kwargs):
            seen[name] = sigma.flatten()[:256]
            return fn(x, sigma, *args, **kwargs)
        return call
    s.fake_train_fn, s.teacher_fn = recording('fake', s.fake_train_fn), recording('teacher', s.teacher_fn)
    slots = [sida.Slot(0, 0, torch.device('cpu'))]
    s.fake_score_step(slots)
    s.generator_step(slots, use_adv=True)
    log_sigma = seen['fake'].log()
    assert abs(log_sigma.mean() + 0.5) < 0.12 and abs(log_sigma.std() - 0.6) < 0.08
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)                # sigma^(1/7) = a + (1 - t)(b - a): Karras's schedule
    t = 1 - (seen['teacher'] ** (1 / 7) - a) / (b - a)
    assert t.min() >= -1e-4 and 0.38 < t.max() <= 0.4 + 1e-4 and abs(t.mean() - 0.2) < 0.03


def test_the_generator_loss_gets_the_alpha_of_the_flag(monkeypatch):
    seen, objective = [], sida.generator_objective
    monkeypatch.setattr(sida, 'generator_objective', lambda x_g, real, fake, ok, alpha, *a, **k:
                        seen.append(alpha) or objective(x_g, real, fake, ok, alpha, *a, **k))
    s = bench_sida('ddpmpp', '--alpha', '1.2')
    s.generator_step([sida.Slot(0, 0, torch.device('cpu'))], use_adv=True)
    assert seen == [1.2]


def test_the_fake_score_step_augments_generated_and_real_images_alike(monkeypatch):
    """With --augment > 0 both halves of the discriminator's batch are augmented, each with its own draws, and
    f_psi gets their augmentation labels (not zeros)."""
    calls, augment = [], networks.augment
    monkeypatch.setattr(networks, 'augment', lambda x, p, gen: calls.append((x, p)) or augment(x, p, gen))
    s = bench_sida('ddpmpp', '--augment', '0.5')
    labels = []
    train = s.fake_train_fn
    s.fake_train_fn = lambda *args, **kwargs: labels.append(args[3]) or train(*args, **kwargs)
    s.fake_score_step([sida.Slot(0, 0, torch.device('cpu'))])
    assert [p for _, p in calls] == [0.5, 0.5] and not torch.equal(calls[0][0], calls[1][0])   # generated, then real
    [aug] = labels                                            # generated and real, in one pass
    assert aug.shape == (4, 9) and aug[:2].abs().sum() > 0 and aug[2:].abs().sum() > 0


@pytest.mark.parametrize('arch, method, clip', [('ddpmpp', 'sida', True), ('ddpmpp', 'sid', False), ('edm2', 'sida', False)])
def test_fake_score_gradients_are_clipped_only_in_adversarial_edm_runs(monkeypatch, arch, method, clip):
    """SPEC: clipped to [-1, 1] when the adversarial loss is on, with EDM teachers (the EDM2 runs do not
    clip); the generator's never."""
    seen, guard = [], sida.sanitize_grads
    monkeypatch.setattr(sida, 'sanitize_grads', lambda params, clip_: seen.append(clip_) or guard(params, clip_))
    s = bench_sida(arch, '--method', method)
    slots = [sida.Slot(0, 0, torch.device('cpu'))]
    s.fake_score_step(slots)
    s.generator_step(slots, use_adv=method != 'sid')
    assert seen == [clip, False]


@pytest.mark.parametrize('precision, eps', [('fp32', 1e-8), ('bf16', 1e-8), ('fp16', 1e-6)])
def test_optimizers_are_adams_of_the_paper_each_on_its_network_and_learning_rate(precision, eps):
    s = bench_sida('ddpmpp', '--lr', '1e-4', '--glr', '3e-5', '--precision', precision)
    for opt, net, lr in ((s.opt_f, s.fake_score, 1e-4), (s.opt_g, s.G, 3e-5)):
        [group] = opt.param_groups
        assert isinstance(opt, torch.optim.Adam) and group['betas'] == (0.0, 0.999) and group['eps'] == eps
        assert group['lr'] == lr and [id(p) for p in group['params']] == [id(p) for p in net.parameters()]


def test_metric_names_and_which_value_is_better():
    assert sida.parse_metrics('fid50k,is10k,fd2k') == [('fid50k', 'fid', 50000), ('is10k', 'is', 10000), ('fd2k', 'fd', 2000)]
    assert sida.parse_metrics('fd') == [('fd', 'fd', 2048)] and sida.parse_metrics('none') == []
    for metric, better, worse in (('fid50k', 2.0, 3.0), ('fd', 2.0, 3.0), ('is50k', 9.0, 7.0)):
        m = sida.parse_metrics(metric)
        assert sida.improves({metric: better}, 8.0 if metric == 'is50k' else 2.5, m)
        assert not sida.improves({metric: worse}, 8.0 if metric == 'is50k' else 2.5, m)
        assert sida.improves({metric: worse}, None, m) and not sida.improves({}, None, m)


def test_summary_gives_the_baselines_the_initial_and_the_last_measurement():
    rows = [{'tick': 0, 'kimg': 0.0, 'fd': 5000.0, 'acc': 0.5, 'fd_data': 50.0, 'acc_data': 0.99},
            {'tick': 1, 'kimg': 1.0, 'fd': 900.0, 'acc': 0.8},
            {'tick': 2, 'kimg': 2.0},
            {'tick': 3, 'kimg': 3.0, 'fd': 400.0, 'acc': 0.9}]
    lines = sida.summary(rows, 'sida')
    cells = {line[:42].strip(): line[42:].split() for line in lines}
    assert cells['result'] == ['fd', 'acc'] and cells['real data'] == ['50', '0.99']
    assert cells['initial generator (1 NFE)'] == ['5,000', '0.5']
    assert cells['sida generator (1 NFE), final EMA'] == ['400', '0.9']


class HostReads(TorchDispatchMode):
    """Records the ops that read tensor values back to the host: each is a device synchronisation on a GPU."""
    OPS = {'aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select', 'aten.is_nonzero', 'aten.equal',
           'aten._unique2', 'aten.unique_consecutive', 'aten.repeat_interleave', 'aten.masked_scatter_'}

    READS = ('tolist', 'numpy')        # these read CPU tensors without an ATen operation

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.OPS:
            self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.originals = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, lambda t, *a, _n=name, _f=original, **k: self.seen.append(_n) or _f(t, *a, **k))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


@pytest.mark.parametrize('arch, precision', [('ddpmpp', 'fp32'), ('edm2', 'fp16')])
def test_training_iteration_never_reads_tensors_back_to_the_host(arch, precision):
    s = bench_sida(arch, '--precision', precision)
    slots = [sida.Slot(0, 0, torch.device('cpu'))]
    s.fake_score_step(slots)                                 # first steps create the optimizer state
    s.generator_step(slots, use_adv=True)
    with HostReads() as reads:
        s.fake_score_step(slots)
        s.generator_step(slots, use_adv=True)
        s.update_ema(10_000)
    assert reads.seen == []
    assert len(s.stats['loss_sid'][0].shape) == 0            # statistics stay on the device until a tick


def test_sid_reads_only_labels_from_the_data():
    """SiD has no discriminator: a data batch would be read (for EDM2 from the latent zip) only to be dropped."""
    s = bench_sida('ddpmpp', '--method', 'sid')
    assert s.sampler.labels is not None
    s.sampler.real = lambda *a: pytest.fail('SiD read a batch of real data')
    s.fake_score_step([sida.Slot(0, 0, torch.device('cpu'))])


@pytest.mark.parametrize('arch, flags', [('ddpmpp', ()), ('ddpmpp', ('--method', 'sid')), ('edm2', ()),
                                         ('edm2', ('--no-logvar',))])
def test_every_trainable_parameter_takes_part_in_its_step(arch, flags):
    """Several GPUs: DDP stops the run at the second step if a trainable parameter got no gradient (e.g. a
    log-variance head that --no-logvar leaves unused), so each step's loss reaches every parameter."""
    s = bench_sida(arch, *flags)
    unused = {}
    s.optimizer_step = lambda opt, scaler, net, clip: unused.setdefault(
        'G' if net is s.G else 'fake score', [n for n, p in net.named_parameters() if p.grad is None])
    slots = [sida.Slot(0, 0, torch.device('cpu'))]
    s.fake_score_step(slots)
    s.generator_step(slots, use_adv=s.adversarial)
    assert unused == {'fake score': [], 'G': []}
    assert s.use_logvar == (arch == 'edm2' and '--no-logvar' not in flags)


@pytest.mark.parametrize('arch, graphs', [('ddpmpp', 3), ('edm2', 4)])   # EDM2's G has no logvar head of its own
def test_compiled_iteration_equals_eager_without_graph_breaks(monkeypatch, tmp_path, arch, graphs):
    """--compile traces every network call whole (no graph breaks) into graphs shared between calls; the
    aot_eager backend (no code generation, so quick on a CPU) gives the eager losses."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', '')
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR')              # restored after the test
    torch._dynamo.reset()
    counters.clear()
    stats = {}
    # config.patch restores the dynamo settings (compile_fn turns suppress_errors on; a failure must show here).
    with torch._dynamo.config.patch(suppress_errors=False):
        try:
            for flags in ((), ('--compile',)):
                s = bench_sida(arch, *flags)
                torch._dynamo.config.suppress_errors = False
                slot = sida.Slot(0, 0, torch.device('cpu'))
                for _ in range(2):
                    s.fake_score_step([slot])
                    s.generator_step([slot], use_adv=True)
                stats[flags] = {k: float(v[0]) / v[1] for k, v in s.stats.items()}
            assert not counters['graph_break'], dict(counters['graph_break'])
            assert counters['stats']['unique_graphs'] == graphs
            assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path / '.cache/sida/torchinductor')
        finally:
            torch._dynamo.reset()
    for k, v in stats[()].items():
        assert abs(stats[('--compile',)][k] - v) <= 1e-4 * abs(v) + 1e-5, (k, v, stats[('--compile',)][k])


def test_warmup_schedule_switches_at_the_right_image_counts(tiny_teacher, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(sida.SiDA, 'fake_score_step', lambda self, slots: calls.append(('fake', None)))
    monkeypatch.setattr(sida.SiDA, 'generator_step', lambda self, slots, use_adv: calls.append(('gen', use_adv)))
    monkeypatch.setattr(sida.SiDA, 'update_ema', lambda self, nimg: calls.append(('ema', nimg)))
    sida.distill(sida.parse_args(['--teacher', tiny_teacher, '--data', 'toy', '--cond', '--batch', '8',
                                  '--gen-start-kimg', '0.016', '--adv-start-kimg', '0.032', '--duration', '0.000048',
                                  '--metrics', 'none', '--device', 'cpu', '--outdir', str(tmp_path)]))
    # nimg before each iteration: 0, 8, 16, 24, 32, 40 -> as upstream (cur_nimg > 100k, > 200k), the generator
    # steps once more than 16 images were seen, the adversarial term once more than 32.
    # The EMA ramp-up counts the images before the step (upstream: beta from cur_nimg before it grows).
    assert calls == [('fake', None), ('fake', None), ('fake', None), ('fake', None), ('gen', False), ('ema', 24),
                     ('fake', None), ('gen', False), ('ema', 32), ('fake', None), ('gen', True), ('ema', 40)]


def test_each_slot_has_dropout_masks_of_its_own_that_depend_on_the_seed_and_the_slot_only():
    def masks(index, seed):                                  # two rounds of one slot in one process
        slot, one_process = sida.Slot(index, seed, torch.device('cpu')), types.SimpleNamespace(world=1)
        return [F.dropout(torch.ones(1000), 0.5)
                for _ in sida.SiDA.rounds(one_process, None, [slot, slot], unchanged=(torch.nn.Module(), None))]
    first = masks(0, 3)
    assert torch.equal(first[0], masks(0, 3)[0]) and torch.equal(first[1], masks(0, 3)[1])
    assert not torch.equal(first[0], first[1])                                  # each round draws anew
    assert not torch.equal(first[0], masks(1, 3)[0]) and not torch.equal(first[0], masks(0, 4)[0])


def test_a_finished_run_gives_back_the_signal_handlers(tiny_teacher, monkeypatch, tmp_path):
    """The loop turns SIGTERM / SIGINT into a saved stop while it runs; a caller's handlers are back afterwards."""
    for step in ('fake_score_step', 'generator_step', 'update_ema'):
        monkeypatch.setattr(sida.SiDA, step, lambda self, *a, **k: None)
    mine = lambda signum, frame: None
    saved = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sida.distill(sida.parse_args(tiny_run_argv(tmp_path, tiny_teacher, '--duration', '0.000016')))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_compiled_run_logs_each_steps_first_iteration(tiny_teacher, monkeypatch, tmp_path, capsys):
    """--compile: each step's graphs compile on its first use; the console says how long that iteration took."""
    for step in ('fake_score_step', 'generator_step', 'update_ema'):
        monkeypatch.setattr(sida.SiDA, step, lambda self, *a, **k: None)
    compiled = []
    monkeypatch.setattr(sida.SiDA, 'compile', lambda self: compiled.append(True))
    sida.distill(sida.parse_args(['--teacher', tiny_teacher, '--data', 'toy', '--cond', '--batch', '8', '--compile',
                                  '--gen-start-kimg', '0.016', '--adv-start-kimg', '0.032', '--duration', '0.000048',
                                  '--metrics', 'none', '--device', 'cpu', '--outdir', str(tmp_path)]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('--compile: the first')]
    assert compiled == [True]
    assert [line.split(' step took')[0].split('with the ')[1] for line in lines] == \
        ['fake score', 'generator', 'adversarial generator']


def test_sid2a_distils_from_the_init_generator_not_from_the_teacher(tiny_teacher, tmp_path):
    """SiD²A: G, and so its EMA (the snapshot), starts as --init-generator, not as the teacher: before the
    generator starts (16 images here) the snapshot is the init generator itself."""
    init = networks.load_network(tiny_teacher)
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.01 * torch.randn_like(p))
    networks.save_network(init, str(tmp_path / 'sid-generator.pt'))
    run_sida(tmp_path / 'run', tiny_teacher, '--method', 'sid2a', '--init-generator', str(tmp_path / 'sid-generator.pt'),
             '--duration', '0.000008')
    snapshot = networks.load_network(str(tmp_path / 'run' / 'generator-000000.008.pt')).state_dict()
    assert all(torch.equal(snapshot[k], v) for k, v in init.state_dict().items())


@pytest.mark.parametrize('precision, dropout', [('fp32', '0'), ('bf16', '0'), ('fp32', '0.2')])  # bf16: sida.cast_once
def test_two_process_gloo_run_matches_one_process(tiny_teacher, tmp_path, precision, dropout):
    """Each slot's draws, dropout masks included, are the same whichever process runs it in which round."""
    flags = ('--duration', '0.000048', '--batch-gpu', '4', '--precision', precision, '--dropout', dropout)
    run_sida(tmp_path / 'one', tiny_teacher, *flags)
    run_sida(tmp_path / 'two', tiny_teacher, *flags, nproc=2)
    one = networks.load_network(str(tmp_path / 'one' / 'generator-000000.048.pt')).state_dict()
    two = networks.load_network(str(tmp_path / 'two' / 'generator-000000.048.pt')).state_dict()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
    state = torch.load(tmp_path / 'two' / 'training-state.pt', weights_only=True)
    assert state['nimg'] == 48 and len(state['rng']) == 2


def fault_on_rank_1(fault, argv):
    """sida.main(argv) in a torchrun worker; rank 1 alone meets `fault`: 'metrics' (its measurement raises),
    'nonfinite' (its generated samples are never finite), 'signal' (SIGTERM at its second generator step)."""
    if os.environ['RANK'] == '1':
        if fault == 'metrics':
            sida.Evaluator.__call__ = lambda self, G: 1 / 0
        step, calls = sida.SiDA.generator_step, []

        def faulty_step(self, *a, **k):
            step(self, *a, **k)
            calls.append(1)
            if fault == 'nonfinite':
                self.worst_streak = torch.tensor(1e9)
            if fault == 'signal' and len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        sida.SiDA.generator_step = faulty_step
    sida.main(argv)


def run_faulty_pair(tmp_path, teacher, fault, *extra):
    """A two-process tiny run with a fault on rank 1 (fault_on_rank_1); it must end, not hang."""
    driver = tmp_path / 'driver.py'
    driver.write_text(f'import sys\nsys.path.insert(0, {HERE!r})\nimport test_sida\n'
                      f'test_sida.fault_on_rank_1(sys.argv[1], sys.argv[2:])\n')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver), fault,
           *tiny_run_argv(tmp_path / 'run', teacher, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=150,
                          cwd=HERE)


def test_a_measurement_failing_on_one_rank_stops_every_rank(tiny_teacher, tmp_path):
    """The other ranks would wait for it inside the measurement's collectives (a hang, not a warning)."""
    r = run_faulty_pair(tmp_path, tiny_teacher, 'metrics', '--duration', '0.000032', '--metrics', 'fd', '--snap', '1')
    assert r.returncode != 0
    assert 'measuring fd failed (ZeroDivisionError: division by zero) on rank 1, which stops a run' in r.stderr


def test_non_finite_samples_on_one_rank_stop_every_rank_in_one_line(tiny_teacher, tmp_path):
    r = run_faulty_pair(tmp_path, tiny_teacher, 'nonfinite', '--duration', '0.000064', '--max-nonfinite', '5')
    assert r.returncode != 0
    assert r.stderr.count('error: no finite generated sample in 5 iterations in a row; stopped (no state was '
                          'saved yet)') == 2, r.stderr[-3000:]


def test_a_signal_to_one_rank_stops_every_rank_and_is_reported(tiny_teacher, tmp_path):
    # Rank 1 gets the signal in the 5th iteration (its 2nd generator step); every rank stops after the next one.
    r = run_faulty_pair(tmp_path, tiny_teacher, 'signal', '--duration', '0.000512')
    assert r.returncode != 0, r.stderr[-2000:]                       # (torchrun's, for a worker's 143)
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert f'stopped by signal {int(signal.SIGTERM)} at 0.048 kimg; continue with --resume' in log, log[-2000:]
    assert torch.load(tmp_path / 'run' / 'training-state.pt', weights_only=True)['nimg'] == 48


def test_a_run_resumed_on_another_number_of_processes_continues_every_random_stream(tiny_teacher, tmp_path):
    """Two processes of one round each, then one process of two rounds: the slots' streams go on where they
    were, as in the uninterrupted one-process run (only another --batch-gpu makes other slots)."""
    run_sida(tmp_path / 'whole', tiny_teacher, '--duration', '0.000064', '--batch-gpu', '4', '--dropout', '0.2')
    run_sida(tmp_path / 'split', tiny_teacher, '--duration', '0.000032', '--batch-gpu', '4', '--dropout', '0.2', nproc=2)
    r = run_sida(tmp_path / 'x', tiny_teacher, '--duration', '0.000064', '--dropout', '0.2',
                 '--resume', str(tmp_path / 'split'))
    assert 'restart' not in r.stdout
    a = torch.load(tmp_path / 'whole' / 'training-state.pt', weights_only=True)
    b = torch.load(tmp_path / 'split' / 'training-state.pt', weights_only=True)
    assert a['nimg'] == b['nimg'] == 64
    assert all(torch.equal(a['rng'][0]['slots'][i], b['rng'][0]['slots'][i]) for i in (0, 1))
    assert a['rng'][0]['dropout'] == b['rng'][0]['dropout']
    for net in a['nets']:
        for k, v in a['nets'][net].items():
            assert torch.allclose(v, b['nets'][net][k], atol=1e-5, rtol=1e-4), (net, k)   # summed in another order


def test_split_run_resumes_bit_identically(tiny_teacher, tmp_path):
    run_sida(tmp_path / 'whole', tiny_teacher, '--duration', '0.000064')
    run_sida(tmp_path / 'split', tiny_teacher, '--duration', '0.000032')
    run_sida(tmp_path / 'x', tiny_teacher, '--duration', '0.000064', '--resume', str(tmp_path / 'split'))
    a = torch.load(tmp_path / 'whole' / 'training-state.pt', weights_only=True)
    b = torch.load(tmp_path / 'split' / 'training-state.pt', weights_only=True)
    assert a['nimg'] == b['nimg'] == 64
    for net in a['nets']:
        for k, v in a['nets'][net].items():
            assert torch.equal(v, b['nets'][net][k]), (net, k)


def test_resume_repairs_a_cut_log_and_drops_rows_past_the_state(tiny_teacher, tmp_path):
    """A kill in mid-append leaves log.jsonl ending in half a line, and rows logged after the last saved state
    are redone on resume: the resumed run neither dies on the broken line nor logs a tick twice."""
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000032')
    log = tmp_path / 'log.jsonl'
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r['tick'] for r in rows] == [0, 1, 2]
    with open(log, 'a') as f:                        # tick 3 logged, then a kill while writing tick 4
        f.write(json.dumps(dict(rows[-1], tick=3, kimg=0.048)) + '\n' + '{"tick": 4, "kimg": 0.0')
    with open(log, 'ab') as f:                       # and lines no log has: bytes that are no UTF-8, a bare number
        f.write(b'\n\xff\xfe\n3\n{"tick": "5"}\n')             # and a row of the wrong shape
    r = run_sida(tmp_path / 'x', tiny_teacher, '--duration', '0.000064', '--resume', str(tmp_path))
    assert 'skipped 4 unreadable line(s)' in r.stdout
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r['tick'] for r in rows] == [0, 1, 2, 3, 4]
    assert torch.load(tmp_path / 'training-state.pt', weights_only=True)['nimg'] == 64


def test_resume_with_different_method_flags_is_refused(tiny_teacher, tmp_path):
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000016')
    r = run_sida(tmp_path, tiny_teacher, '--duration', '0.000032', '--method', 'sid', '--alpha', '1.2',
                 '--resume', str(tmp_path), check=False)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert '--method' in r.stderr and '--alpha' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sigterm_saves_state_and_the_run_resumes(tiny_teacher, tmp_path):
    cmd = [sys.executable, os.path.join(HERE, 'sida.py'), '--teacher', tiny_teacher, '--data', 'toy', '--cond',
           '--batch', '8', '--duration', '1', '--tick', '1000', '--metrics', 'none', '--device', 'cpu',
           '--gen-start-kimg', '0', '--outdir', str(tmp_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(tmp_path / 'args.json'):
        time.sleep(0.2)
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err          # saved, not finished: `sida.py && next` stops
    assert 'continue with --resume' in out
    state = torch.load(tmp_path / 'training-state.pt', weights_only=True)
    assert 0 < state['nimg'] < 1_000_000
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--resume', str(tmp_path),
                        '--duration', str((state['nimg'] + 16) / 1e6)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / 'training-state.pt', weights_only=True)['nimg'] == state['nimg'] + 16


def test_outputs_of_a_short_run(tiny_teacher, tmp_path):
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000048', '--metrics', 'fd', '--snap', '2')
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert rows[-1]['kimg'] == 0.048
    for key in ('loss_fake_score', 'loss_disc', 'loss_sid', 'loss_adv', 'sec_per_kimg', 'img_per_s', 'peak_gb'):
        assert key in rows[-1], key
    assert any('fd' in r for r in rows)
    for name in ('samples-000000.048.png', 'generator-000000.048.pt', 'generator-best.pt', 'training-state.pt',
                 'metrics.png', 'log.txt'):
        assert (tmp_path / name).exists(), name
    assert networks.load_network(str(tmp_path / 'generator-best.pt')).meta['method'] == 'sida'


def test_an_unchanged_generator_is_not_measured_again(tiny_teacher, tmp_path, monkeypatch):
    """During the discriminator warm-up the EMA generator does not change: its snapshot ticks repeat the last
    measurement instead of sampling again; the first tick after a generator step measures."""
    calls = []
    measure = sida.Evaluator.__call__
    monkeypatch.setattr(sida.Evaluator, '__call__', lambda self, G: calls.append(1) or measure(self, G))
    sida.main(tiny_run_argv(tmp_path, tiny_teacher, '--gen-start-kimg', '0.032', '--duration', '0.000048',
                            '--snap', '1', '--metrics', 'fd1k'))
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['kimg'] for r in rows] == [0, 0.016, 0.032, 0.048]
    assert len(calls) == 2                                     # tick 0 and tick 3 (after the first generator step)
    assert rows[1]['fd1k'] == rows[2]['fd1k'] == rows[0]['fd1k'] and rows[1]['acc1k'] == rows[0]['acc1k']
    assert rows[3]['fd1k'] != rows[0]['fd1k']


def test_console_prints_options_and_one_readable_line_per_tick_into_log_txt(tiny_teacher, tmp_path):
    r = run_sida(tmp_path, tiny_teacher, '--duration', '0.000032')
    log_txt = open(tmp_path / 'log.txt').read()
    assert r.stdout.strip() and r.stdout.strip() in log_txt            # the console, teed to log.txt
    assert 'run options:' in r.stdout and 'lsg-gan 0.01' in r.stdout and 'session options:' in r.stdout
    ticks = [line for line in r.stdout.splitlines() if line.startswith('tick ')]
    assert len(ticks) == 3                                              # tick 0, then 0.016 and 0.032 kimg
    assert 'ETA' in ticks[-1] and 'img/s' in ticks[-1] and '100.0%' in ticks[-1] and 'fake_score' in ticks[-1]
    assert not any(line.lstrip().startswith('{') for line in r.stdout.splitlines())     # JSON goes to log.jsonl
    with PIL.Image.open(tmp_path / 'metrics.png') as plot:              # the loss curves, even without metrics
        assert plot.size[0] >= 360


def test_help_shows_every_flag_with_its_default():
    parser = sida.build_parser()
    assert all(act.help for act in parser._actions)
    text = parser.format_help()
    assert '(default: 0.01)' in text and '--lsg-gan' in text
    # Every flag with a default (other than None or False) shows it, unless its help already says it.
    shown = [act for act in parser._actions if act.default is not None and act.default is not False
             and act.default != argparse.SUPPRESS and 'default' not in act.help]
    assert {'batch', 'seed', 'method', 'lsg_gan', 'tick'} <= {act.dest for act in shown}
    assert text.count('(default: ') == len(shown) + sum('(default: ' in act.help for act in parser._actions)
    for act in shown:
        assert f'(default: {act.default})' in ' '.join(text.split()), act.dest


def test_every_flag_is_a_run_session_or_tool_flag():
    """A forker's new flag must land in a group: run flags are saved and checked on --resume, session flags
    restored; a flag outside the groups would silently be neither."""
    groups = sida.flag_groups(sida.build_parser())
    assert set(groups) == {'options', 'run', 'session', 'where and how'}
    assert groups['options'] == ['help']
    assert {'method', 'alpha', 'lsg_gan', 'force_norm'} <= set(sida.RUN_FLAGS)
    assert {'teacher', 'data', 'duration', 'metrics'} <= set(sida.SESSION_FLAGS)


def test_preset_keeps_flags_given_on_the_command_line():
    args = sida.parse_args(['--preset', 'toy', '--batch', '256', '--lr', '1e-5', '--method', 'sid'])
    assert (args.batch, args.lr, args.method) == (256, 1e-5, 'sid')      # given, even where equal to the defaults
    assert args.glr == sida.TOY_PRESET['glr'] and args.data == 'toy'
    # The EDM2 toy's own settings apply over the toy preset's, and flags given still win over both.
    edm2 = sida.parse_args(['--preset', 'toy', '--arch', 'edm2', '--glr', '2e-4'])
    assert (edm2.lr, edm2.glr, edm2.lsd, edm2.lsg_gan, edm2.batch) == (1e-3, 2e-4, 100., 0.01, sida.TOY_PRESET['batch'])


def test_abbreviated_flags_are_refused():
    with pytest.raises(UserError, match='--dur'):
        sida.parse_args(['--dur', '5'])


def test_fractional_ticks_give_one_snapshot_file_each(tiny_teacher, tmp_path):
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000024', '--tick', '0.008', '--snap', '1')
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith('generator-0'))
    assert names == ['generator-000000.000.pt', 'generator-000000.008.pt', 'generator-000000.016.pt',
                     'generator-000000.024.pt']


UNREACHABLE = 'http://127.0.0.1:9/teacher.pkl'     # a teacher that fails only if something tries to load it


@pytest.mark.parametrize('argv, message', [
    (['--teacher', '/nonexistent/teacher.pkl'], 'teacher.pkl'),
    (['--teacher', UNREACHABLE], 'could not reach http://127.0.0.1:9/teacher.pkl'),
    (['--batch', '10', '--batch-gpu', '4'], '--batch 10 is not a multiple of --batch-gpu 4'),
    (['--method', 'sida', '--data', None], '--data'),
    (['--metrics', 'fid50k'], '--ref'),
    (['--duration', '-1'], '--duration -1.0: must be in 1e-6..1e6'),              # out of range: refused at parse time
    # Inputs checked before the teacher is loaded (an unreachable one: it is never tried).
    (['--teacher', UNREACHABLE, '--data', '/nonexistent/images.zip'], '--data /nonexistent/images.zip: no such file'),
    (['--teacher', UNREACHABLE, '--metrics', 'fid50k', '--ref', '/nonexistent/ref.npz'], '--ref /nonexistent/ref.npz'),
    (['--teacher', UNREACHABLE, '--metrics', 'fid50k'], '--ref'),
    (['--teacher', UNREACHABLE, '--method', 'sid2a', '--init-generator', '/nonexistent/g.pt'], '--init-generator'),
    (['--teacher', UNREACHABLE, '--method', 'sid2a'], '--init-generator'),
    (['--teacher', UNREACHABLE, '--method', 'sida', '--data', None], '--data'),
    (['--teacher', UNREACHABLE, '--method', 'sid', '--data', None, '--metrics', 'fd'], "fd is the toy run's metric"),
    (['--teacher', UNREACHABLE, '--resume', '/nonexistent/run', '--outdir', None], '--resume'),
    (['--resume', ''], '--resume: an empty folder name'),
    (['--resume', '/nonexistent/run'], '--resume /nonexistent/run and --outdir'),   # two different folders
    (['--arch', 'edm2'], '--arch chooses the toy teacher: it needs --preset toy'),
    (['--teacher', HERE], f'{HERE}: a folder, not a file'),
    (['--metrics', 'fd0k'], '--metrics: fd0k measures no images'),
    (['--metrics', 'fd,fd1k'], '--metrics fd,fd1k: one fd metric at most'),
])
def test_bad_inputs_give_one_line_errors_and_write_nothing(tiny_teacher, tmp_path, argv, message):
    base = ['--teacher', tiny_teacher, '--data', 'toy', '--cond', '--metrics', 'none', '--device', 'cpu',
            '--outdir', str(tmp_path / 'out')]
    for flag, value in zip(argv[::2], argv[1::2]):
        i = base.index(flag) if flag in base else None
        if i is not None:
            del base[i:i + 2]
        if value is not None:
            base += [flag, value]
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), *base], capture_output=True, text=True,
                       timeout=60)                     # a value out of range once started a whole run
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'out').exists()                 # not even the folder, nor log.txt or args.json in it


@pytest.mark.parametrize('argv, message', [
    (['--batch', '10', '--batch-gpu', '4'], '--batch 10 is not a multiple of --batch-gpu 4'),
    (['--duration', 'nan'], '--duration nan: must be in 1e-6..1e6'),
    (['--duration', '1e-300'], '--duration 1e-300: must be in 1e-6..1e6'),     # (no image at all)
    (['--batch', '-4'], '--batch -4: must be in 1..2**31'),
    (['--batch', '99999999999999999999'], '--batch 99999999999999999999: must be in 1..2**31'),
    (['--batch-gpu', '0'], '--batch-gpu 0: must be in 1..2**31'),
    (['--tick', '0'], '--tick 0.0: must be > 0'),
    (['--snap', '0'], '--snap 0: must be in 1..2**31'),
    (['--dump', '-1'], '--dump -1: must be in 1..2**31'),
    (['--lr', '-0.5'], '--lr -0.5: must be >= 0'),
    (['--glr', 'inf'], '--glr inf: must be >= 0'),
    (['--augment', '1.5'], '--augment 1.5: must be in [0, 1]'),
    (['--dropout', '-0.1'], '--dropout -0.1: must be in [0, 1]'),
    (['--tmax', '0'], '--tmax 0: must be in 1..1000'),
    (['--init-sigma', '0'], '--init-sigma 0.0: must be > 0'),
    (['--seed', '-1'], '--seed -1: must be in 0..2**40'),
    (['--seed', '18446744073709'], '--seed 18446744073709: must be in 0..2**40'),   # (its streams' seeds overflow)
    (['--max-nonfinite', '0'], '--max-nonfinite 0: must be in 1..2**31'),
    (['--p-std', '0'], '--p-std 0.0: must be > 0'),
    (['--alpha', 'nan'], '--alpha nan: must be a finite number'),
    (['--metrics', 'fid50'], '--metrics: unknown metric "fid50"'),
    (['--ema', '-1'], '--ema -1.0: must be >= 0'),
    (['--lsg-gan', '-1'], '--lsg-gan -1.0: must be >= 0'),
    (['--gen-start-kimg', '-1'], '--gen-start-kimg -1.0: must be >= 0'),
    (['--outdir', ''], '--outdir: an empty folder name'),
    (['--resume', 'FILE'], '--resume FILE: a file; --resume takes the run\'s folder'),
    (['--bogus'], 'unrecognized arguments: --bogus'),
])
def test_flags_out_of_range_are_refused_at_parse_time(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'FILE').write_text('')
    with pytest.raises(UserError) as error:
        sida.parse_args(['--data', 'toy', *argv])
    assert str(error.value).startswith(message), str(error.value)


def test_help_fits_on_a_screen_and_names_only_the_loops_flags():
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) <= 90
    assert '(default: None)' not in r.stdout and not any(line.count('default') > 1 for line in r.stdout.splitlines())
    assert not any(flag in r.stdout for flag in ('--bench', '--profile', '--prepare-latents', '--cbase'))


def test_bench_targets_are_the_papers_networks_at_batch_1_on_the_cpu():
    runs = bench.parse_runs(['--device', 'cpu'], torch.device('cpu'))
    assert [(name, mode) for name, mode, _ in runs] == [('cifar10', 'eager'), ('imagenet64', 'eager'), ('edm2-xs', 'eager')]
    configs = {name: bench.network_config(args)['kwargs'] for name, _, args in runs}
    assert configs['cifar10']['model_channels'] == 128 and configs['cifar10']['channel_mult'] == [2, 2, 2]
    assert configs['imagenet64']['model_type'] == 'DhariwalUNet' and configs['imagenet64']['label_dim'] == 1000
    assert configs['edm2-xs']['img_channels'] == 4 and configs['edm2-xs']['dropout'] == 0
    assert all(args.batch_gpu == 1 and args.iters == 1 and args.precision == 'fp32' for _, _, args in runs)
    modes = {mode: args for _, mode, args in bench.parse_runs(['--modes', 'eager,compile,cudagraphs'], torch.device('cpu'))}
    assert [(m, a.compile, a.compile_mode) for m, a in modes.items()] == [
        ('eager', False, None), ('compile', True, None), ('cudagraphs', True, 'reduce-overhead')]
    with pytest.raises(UserError, match='--targets: unknown cifar'):
        bench.parse_runs(['--targets', 'cifar'], torch.device('cpu'))


def test_bench_runs_every_target_and_prints_one_line_each():
    """The three targets' architectures, made small (--cbase 8 after the targets' flags)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, 'bench.py'), '--device', 'cpu', '--cbase', '8'],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x['target'], x['arch'], x['batch_gpu']) for x in results] == [('cifar10', 'ddpmpp', 1), ('imagenet64', 'adm', 1),
                                                                           ('edm2-xs', 'edm2', 1)]
    assert all(x['eager_ops_per_iter'] > 1000 and x['img_per_s'] > 0 for x in results)


def test_every_numeric_flag_has_a_range():
    numeric = {act.dest for act in sida.build_parser()._actions if act.type in (int, float)}
    assert numeric == set(sida.FLAG_RANGES)


def test_failed_start_in_an_existing_folder_leaves_it_as_it_was(tiny_teacher, tmp_path):
    """A failure after the teacher, the data and the networks are loaded writes nothing either: log.txt
    is not appended to and no args.json appears."""
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'log.txt').write_text('an attempt stopped before its first state\n')
    write_dataset(tmp_path / 'd', 4, 16)              # unlabelled, for a conditional teacher: found once loaded
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--teacher', tiny_teacher, '--data',
                        str(tmp_path / 'd'), '--cond', '--metrics', 'none', '--device', 'cpu', '--outdir',
                        str(tmp_path / 'out')], capture_output=True, text=True)
    assert r.returncode == 1 and 'class labels' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / 'out') == ['log.txt']
    assert (tmp_path / 'out' / 'log.txt').read_text() == 'an attempt stopped before its first state\n'


@pytest.mark.parametrize('argv, message', [
    (['--duration', '-1'], '--duration'),
    (['--data', '/nonexistent/images'], '--data'),
    (['--teacher', 'OTHER'], 'another architecture'),        # found once both are loaded
    (['--teacher', 'MOVED'], 'other teacher weights'),       # the same architecture, one weight moved
])
def test_a_bad_resume_changes_nothing_in_the_run(tiny_teacher, tmp_path, argv, message):
    run_sida(tmp_path / 'run', tiny_teacher, '--duration', '0.000016')
    before = {n: (tmp_path / 'run' / n).read_bytes() for n in os.listdir(tmp_path / 'run')}
    torch.manual_seed(0)
    networks.save_network(networks.build_network({**TINY, 'kwargs': {**TINY['kwargs'], 'model_channels': 16}}),
                          str(tmp_path / 'other.pt'))
    moved = networks.load_network(tiny_teacher, 'cpu')
    with torch.no_grad():
        next(moved.parameters()).view(-1)[0] += 0.1
    networks.save_network(moved, str(tmp_path / 'moved.pt'))
    argv = [str(tmp_path / {'OTHER': 'other.pt', 'MOVED': 'moved.pt'}[a]) if a in ('OTHER', 'MOVED') else a for a in argv]
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--resume', str(tmp_path / 'run'), *argv],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=60)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {n: (tmp_path / 'run' / n).read_bytes() for n in os.listdir(tmp_path / 'run')} == before


def test_a_state_that_does_not_fit_the_networks_is_refused_in_one_line(tiny_teacher, tmp_path):
    run_sida(tmp_path / 'run', tiny_teacher, '--duration', '0.000016')
    path = tmp_path / 'run' / 'training-state.pt'
    state = torch.load(path, weights_only=True)
    del state['nets']['fake_score'][next(iter(state['nets']['fake_score']))]
    torch.save(state, path)
    before = {n: (tmp_path / 'run' / n).read_bytes() for n in os.listdir(tmp_path / 'run')}
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--resume', str(tmp_path / 'run')],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=60)
    assert r.returncode == 1 and 'does not fit the networks' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Missing key' in r.stderr
    assert {n: (tmp_path / 'run' / n).read_bytes() for n in os.listdir(tmp_path / 'run')} == before


def test_a_folder_in_use_by_another_run_is_refused(tiny_teacher, tmp_path):
    """Two runs started into one folder (the same --outdir twice, or a second --resume) would interleave their
    logs and overwrite each other's states: the second stops in one line while the first holds the folder."""
    import fcntl
    (tmp_path / 'out').mkdir()
    with open(tmp_path / 'out' / '.lock', 'a') as held:             # the first run, alive
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_sida(tmp_path / 'out', tiny_teacher, '--duration', '0.000016', check=False)
    assert r.returncode == 1 and 'in use by another run' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / 'out') == ['.lock']
    run_sida(tmp_path / 'out', tiny_teacher, '--duration', '0.000016')    # the lock ends with its process


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_results(tiny_teacher, tmp_path):
    """Without a training state (deleted to save disk, say) a folder's snapshots and log are still a run's
    results: a new run does not overwrite them."""
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000032', '--snap', '1')
    (tmp_path / 'training-state.pt').unlink()
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    r = run_sida(tmp_path, tiny_teacher, '--duration', '0.000032', check=False)
    assert r.returncode == 1 and 'holds an earlier run without a training state' in r.stderr, r.stderr
    assert 'generator-000000.032.pt' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_a_new_run_refuses_a_folder_of_other_files_and_removes_only_its_own_temporary_files(tiny_teacher, tmp_path):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'args.json').write_text('{"my": "settings"}')
    (tmp_path / 'mine' / 'notes.txt').write_text('mine')
    r = run_sida(tmp_path / 'mine', tiny_teacher, '--duration', '0.000008', check=False)
    assert r.returncode == 1 and 'holds files that are not a run\'s (notes.txt)' in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path / 'mine')) == ['args.json', 'notes.txt']
    assert (tmp_path / 'mine' / 'args.json').read_text() == '{"my": "settings"}'
    (tmp_path / 'run').mkdir()                       # a kill's leftovers: this program's temporary file, and another's
    (tmp_path / 'run' / '.log.jsonl.k3j_x9a2.tmp').write_text('')
    (tmp_path / 'run' / '.editor-swap.tmp').write_text('')
    run_sida(tmp_path / 'run', tiny_teacher, '--duration', '0.000008')
    assert '.editor-swap.tmp' in os.listdir(tmp_path / 'run') and '.log.jsonl.k3j_x9a2.tmp' not in os.listdir(tmp_path / 'run')


@pytest.mark.parametrize('case', ['outdir under a file', 'init-generator without sid2a', 'init-generator of other images'])
def test_inputs_that_do_not_fit_are_refused_before_the_folder_is_written(tiny_teacher, tmp_path, capsys, case):
    other = networks.build_network({**TINY, 'kwargs': {**TINY['kwargs'], 'img_channels': 1}})
    networks.save_network(other, str(tmp_path / 'gray.pt'))
    (tmp_path / 'file').write_text('')
    argv, message = {
        'outdir under a file': (['--outdir', str(tmp_path / 'file' / 'run')], 'is not a writable folder'),
        'init-generator without sid2a': (['--init-generator', str(tmp_path / 'gray.pt')], 'is for --method sid2a'),
        'init-generator of other images': (['--method', 'sid2a', '--init-generator', str(tmp_path / 'gray.pt')],
                                           'makes 1x16x16 images of 4 classes, the teacher 3x16x16 images of 4 classes'),
    }[case]
    with pytest.raises(SystemExit) as e:
        sida.main(tiny_run_argv(tmp_path / 'out', tiny_teacher, *argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()


def test_ctrl_c_before_the_loop_is_one_line(tiny_teacher, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(networks, 'load_network', interrupted)
    with pytest.raises(SystemExit) as e:
        sida.main(tiny_run_argv(tmp_path, tiny_teacher))
    assert e.value.code == 130 and capsys.readouterr().err == 'error: interrupted\n'


def test_no_state_is_saved_while_no_sample_is_finite(tiny_teacher, tmp_path, capsys, monkeypatch):
    """A state saved in a non-finite streak would hold the broken networks: the state before it is kept,
    and it is the one the stop message names."""
    step, calls = sida.SiDA.generator_step, []

    def failing_from_the_3rd(self, *a, **k):
        step(self, *a, **k)
        calls.append(1)
        if len(calls) >= 3:                       # (the counters as generator_step keeps them when it drops all)
            self.nonfinite_streak = torch.tensor(len(calls) - 2.)
            self.worst_streak = torch.maximum(self.worst_streak, self.nonfinite_streak)
    monkeypatch.setattr(sida.SiDA, 'generator_step', failing_from_the_3rd)
    with pytest.raises(SystemExit):               # generator steps from iteration 4: states at 16 and 32 images
        sida.main(tiny_run_argv(tmp_path, tiny_teacher, '--duration', '0.000096', '--dump', '1', '--max-nonfinite', '4'))
    out, err = capsys.readouterr()
    assert 'warning: no training state saved at 0.048 kimg' in out and 'no finite generated sample in 4' in err, out
    assert torch.load(tmp_path / 'training-state.pt', weights_only=True)['nimg'] == 32


def test_a_resume_with_another_first_metric_starts_the_best_generator_afresh(tiny_teacher, tmp_path):
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000008', '--metrics', 'fd', '--snap', '1')
    assert 'fd' in networks.load_network(str(tmp_path / 'generator-best.pt'), 'cpu').meta
    r = run_sida(tmp_path / 'x', tiny_teacher, '--duration', '0.000016', '--metrics', 'fd1k', '--resume', str(tmp_path))
    assert 'chosen by fd; generator-best.pt is chosen by fd1k from now on' in r.stdout
    assert 'fd1k' in networks.load_network(str(tmp_path / 'generator-best.pt'), 'cpu').meta


def test_a_stop_saves_the_state_without_measuring_first(tiny_teacher, tmp_path, monkeypatch):
    """A FID-50k takes minutes, more than a scheduler's grace after its SIGTERM: the stop does not measure."""
    measured, steps = [], []
    monkeypatch.setattr(sida.Evaluator, 'baselines', lambda self, teacher: {})
    monkeypatch.setattr(sida.Evaluator, '__call__', lambda self, G: measured.append(1) or {'fd': 1.0 * len(measured)})
    step = sida.SiDA.generator_step

    def signalled_at_the_3rd(self, *a, **k):
        step(self, *a, **k)
        steps.append(1)
        if len(steps) == 3:          # the 6th iteration (nimg 40 before it): mid-tick, the tick ends at once
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(sida.SiDA, 'generator_step', signalled_at_the_3rd)
    with pytest.raises(SystemExit) as e:
        sida.main(tiny_run_argv(tmp_path, tiny_teacher, '--metrics', 'fd', '--snap', '1', '--duration', '0.000096'))
    assert e.value.code == 128 + signal.SIGTERM
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['kimg'] for r in rows] == [0.0, 0.016, 0.032, 0.048] and 'fd' not in rows[-1] and len(measured) == 2
    assert torch.load(tmp_path / 'training-state.pt', weights_only=True)['nimg'] == 48


def test_a_state_of_another_version_is_refused_in_one_line(tiny_teacher, tmp_path):
    run_sida(tmp_path / 'run', tiny_teacher, '--duration', '0.000008')
    path = tmp_path / 'run' / 'training-state.pt'
    state = torch.load(path, weights_only=True)
    del state['rng']
    torch.save(state, path)
    r = run_sida(tmp_path / 'x', tiny_teacher, '--resume', str(tmp_path / 'run'), check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert 'is a training state of another version of sida.py, or damaged' in r.stderr, r.stderr


def test_a_full_disk_when_a_run_starts_is_one_line(tiny_teacher, tmp_path, capsys, monkeypatch):
    full_disk_at(monkeypatch, networks, 'atomic_write', 1)            # args.json
    with pytest.raises(SystemExit) as e:
        sida.main(tiny_run_argv(tmp_path, tiny_teacher))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and 'cannot write the run\'s files (No space left on device)' in err and len(err.splitlines()) == 1


def test_outdir_that_is_a_file_is_refused(tiny_teacher, tmp_path):
    (tmp_path / 'out').write_text('mine')
    r = run_sida(tmp_path / 'out', tiny_teacher, '--duration', '0.000008', check=False)
    assert r.returncode == 1 and '--outdir' in r.stderr and 'not a folder' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / 'out').read_text() == 'mine'


def test_truncated_teacher_is_refused_in_one_line(tiny_teacher, tmp_path):
    data = open(tiny_teacher, 'rb').read()
    with open(tmp_path / 'cut.pt', 'wb') as f:
        f.write(data[:len(data) // 2])
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--teacher', str(tmp_path / 'cut.pt'),
                        '--data', 'toy', '--cond', '--metrics', 'none', '--device', 'cpu', '--outdir',
                        str(tmp_path / 'out')], capture_output=True, text=True)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'cut.pt' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_run_that_stays_nonfinite_stops_and_keeps_the_last_good_state(tmp_path):
    torch.manual_seed(0)
    net = networks.build_network(TINY)
    networks.save_network(net, str(tmp_path / 'good.pt'))
    with torch.no_grad():
        net.model.dec['16x16_aux_conv'].bias.fill_(float('nan'))     # every denoised output is NaN
    networks.save_network(net, str(tmp_path / 'nan.pt'))
    run_sida(tmp_path / 'run', str(tmp_path / 'good.pt'), '--duration', '0.000016')
    state = torch.load(tmp_path / 'run' / 'training-state.pt', weights_only=True)
    state['teacher_sums'] = sida.teacher_sums(net)      # (a state written for the NaN teacher)
    torch.save(state, tmp_path / 'run' / 'training-state.pt')
    good = (tmp_path / 'run' / 'training-state.pt').read_bytes()
    r = run_sida(tmp_path / 'run', str(tmp_path / 'nan.pt'), '--duration', '0.0001', '--resume', str(tmp_path / 'run'),
                 '--max-nonfinite', '2', '--tick', '0.024', '--dump', '1', check=False)
    assert r.returncode == 1 and 'no finite generated sample' in r.stderr, r.stderr
    assert (tmp_path / 'run' / 'training-state.pt').read_bytes() == good
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    # Iterations at nimg 16, 24, 32; the generator steps once nimg > 16 (--gen-start-kimg 0.016): 2 x 8 dropped.
    assert rows[-1]['dropped_gen'] == 16


def test_a_crash_while_writing_leaves_the_previous_file_intact(tmp_path):
    path = str(tmp_path / 'state.pt')
    networks.atomic_write(path, lambda f: f.write(b'good'))
    def crash(f):
        f.write(b'partial')
        raise RuntimeError('killed')
    with pytest.raises(RuntimeError):
        networks.atomic_write(path, crash)
    assert open(path, 'rb').read() == b'good' and os.listdir(tmp_path) == ['state.pt']


@pytest.mark.parametrize('hard_links', [True, False])
def test_a_file_that_appears_while_a_new_one_is_written_is_not_replaced(tmp_path, monkeypatch, hard_links):
    """fid.py ref --dest and encode-latents refuse an existing DEST, then write for minutes or hours: a file put
    there meanwhile by another program stays, and the result is kept under the first free name, said in one line."""
    def no_links(src, dst):                             # a file system without them: a check, then a rename
        raise OSError(errno.EPERM, 'no hard links here')
    if not hard_links:
        monkeypatch.setattr(os, 'link', no_links)
    path = tmp_path / 'ref.npz'
    networks.atomic_write(str(path), lambda f: f.write(b'first'), replace=False)      # a new name: written
    (tmp_path / 'ref-1.npz').write_bytes(b'taken')

    def meanwhile(f):
        f.write(b'ours')
        path.write_bytes(b'theirs')
    with pytest.raises(networks.UserError) as e:
        networks.atomic_write(str(path), meanwhile, replace=False)
    assert str(e.value) == f'{path} appeared while this was being written; not overwriting it: the result is ' \
                           f'{tmp_path / "ref-2.npz"}'
    assert [(tmp_path / n).read_bytes() for n in sorted(os.listdir(tmp_path))] == [b'taken', b'ours', b'theirs']


# ---------------------------------------------------------------------------------------------------
# Faults: a kill at any point, a full disk. The training state is written before anything derived from it,
# so nothing that happens to a run costs more than the iterations since its last state.

FAULT_RUN = ('--snap', '2', '--dump', '2', '--duration', '0.000064')   # 4 ticks of 2 iterations; states at ticks 2, 4


def kill_at(point, nth, argv):
    """sida.main(argv), SIGKILLed at the nth call of a point: 'iteration' (a generator step, after that
    iteration's fake score step), 'state' and 'snapshot' (torch.save of a training state or a network, once
    half of its bytes are written), 'log row' (half of a row appended), 'state after log row' (save_state,
    called once the tick's row is on disk)."""
    calls = []

    def wrap(owner, name, applies=lambda *a: True, write_half=None):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            if applies(*a):
                calls.append(name)
                if len(calls) == nth:
                    if write_half:
                        write_half(original, *a)
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)
        setattr(owner, name, wrapper)

    def half_save(save, obj, f):
        buf = io.BytesIO()
        save(obj, buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()

    def half_row(append, path, row):
        with open(path, 'a') as f:
            f.write(json.dumps(row)[:20])

    saves = lambda fmt: lambda obj, f: isinstance(obj, dict) and obj.get('format') == fmt
    {'iteration': lambda: wrap(sida.SiDA, 'generator_step'),
     'state': lambda: wrap(torch, 'save', saves('sida-training-state'), half_save),
     'snapshot': lambda: wrap(torch, 'save', saves('sida-network'), half_save),
     'log row': lambda: wrap(sida, 'append_row', write_half=half_row),
     'state after log row': lambda: wrap(sida, 'save_state')}[point]()
    sida.main(argv)


def assert_identical(a, b, where='state'):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f'{where}[{i}]')
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def training_rows(folder):
    """log.jsonl without its timings: what a resumed run must reproduce exactly."""
    return [{k: v for k, v in json.loads(line).items() if k not in ('sec_per_kimg', 'img_per_s', 'peak_gb', 'time_s')}
            for line in open(folder / 'log.jsonl')]


@pytest.fixture(scope='module')
def uninterrupted(tiny_teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp('uninterrupted')
    run_sida(folder, tiny_teacher, *FAULT_RUN)
    return folder


@pytest.mark.parametrize('point, nth', [
    ('iteration', 4),               # mid-iteration in tick 3
    ('state', 2),                   # while the final state is written
    ('log row', 4),                 # while tick 3's row is appended
    ('state after log row', 2),     # tick 4 logged, its state not yet written
    ('snapshot', 2),                # while tick 2's generator is written, after its state
    ('snapshot', 3),                # while the final generator is written, after the final state
])
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_state(tiny_teacher, uninterrupted, tmp_path, point, nth):
    r = run_sida(tmp_path, tiny_teacher, *FAULT_RUN, kill_at=(point, nth), check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    run_sida(tmp_path / 'unused', tiny_teacher, *FAULT_RUN, '--resume', str(tmp_path))
    assert_identical(torch.load(tmp_path / 'training-state.pt', weights_only=True),
                     torch.load(uninterrupted / 'training-state.pt', weights_only=True))
    assert training_rows(tmp_path) == training_rows(uninterrupted)       # every tick once, none cut
    snapshots = sorted(n for n in os.listdir(uninterrupted) if n.startswith('generator-'))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('generator-')) == snapshots
    for name in snapshots:                                              # the final one and every one before it
        assert_identical(networks.load_network(str(tmp_path / name)).state_dict(),
                         networks.load_network(str(uninterrupted / name)).state_dict())
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_a_run_killed_before_its_first_state_starts_again_from_scratch(tiny_teacher, uninterrupted, tmp_path):
    r = run_sida(tmp_path, tiny_teacher, *FAULT_RUN, kill_at=('iteration', 1), check=False)
    assert r.returncode == -signal.SIGKILL and (tmp_path / 'log.jsonl').exists()
    r = run_sida(tmp_path / 'unused', tiny_teacher, *FAULT_RUN, '--resume', str(tmp_path), check=False)
    assert r.returncode == 1 and 'without --resume' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    run_sida(tmp_path, tiny_teacher, *FAULT_RUN)
    assert_identical(torch.load(tmp_path / 'training-state.pt', weights_only=True),
                     torch.load(uninterrupted / 'training-state.pt', weights_only=True))
    assert training_rows(tmp_path) == training_rows(uninterrupted)


class FillingFile:
    """A file that fills the disk after `room` bytes: its writes then fail as a full disk's do."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def full_disk_at(monkeypatch, owner, name, nth, applies=lambda *a: True):
    """Make the nth call of owner.name (among those `applies` to) fail as a full disk does: torch.save
    writes into a file that fills up (it then raises what torch raises), anything else raises ENOSPC."""
    original, calls = getattr(owner, name), []

    def fail(*a, **k):
        if applies(*a):
            calls.append(1)
            if len(calls) == nth:
                if name == 'save':
                    return original(a[0], FillingFile(a[1], room=1000), *a[2:], **k)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*a, **k)
    monkeypatch.setattr(owner, name, fail)


@pytest.mark.parametrize('what', ['state', 'log row'])
def test_a_full_disk_while_saving_the_state_or_its_row_keeps_the_last_state_and_stops_in_one_line(
        tiny_teacher, tmp_path, monkeypatch, capsys, what):
    if what == 'state':             # the second state (tick 4); the first, of tick 2, must survive it
        full_disk_at(monkeypatch, torch, 'save', 2, lambda obj, f: obj.get('format') == 'sida-training-state')
    else:                           # tick 3's row: the state of tick 2 stays the last
        full_disk_at(monkeypatch, sida, 'append_row', 4)
    with pytest.raises(SystemExit) as e:
        sida.main(tiny_run_argv(tmp_path, tiny_teacher, *FAULT_RUN))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and 'No space left on device' in err, err
    assert '--resume' in err and 'Traceback' not in err
    state = torch.load(tmp_path / 'training-state.pt', weights_only=True)
    assert (state['nimg'], state['tick']) == (32, 2)
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


@pytest.mark.parametrize('what', ['snapshot', 'plot', 'log.txt'])
def test_a_full_disk_while_writing_a_derived_output_warns_and_the_run_goes_on(
        tiny_teacher, tmp_path, monkeypatch, capsys, what):
    if what == 'snapshot':          # the tick-2 generator
        full_disk_at(monkeypatch, torch, 'save', 2, lambda obj, f: obj.get('format') == 'sida-network')
    elif what == 'plot':
        full_disk_at(monkeypatch, fid, 'plot_metrics', 2)
    else:                           # log.txt fills up after 1000 characters
        class Filling(io.StringIO):
            def write(self, text):
                if self.tell() + len(text) > 1000:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return super().write(text)
        monkeypatch.setattr(sida, 'open', lambda path, *a, real=open: Filling() if path.endswith('log.txt') else real(path, *a),
                            raising=False)
    sida.main(tiny_run_argv(tmp_path, tiny_teacher, *FAULT_RUN))
    warnings_ = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning:')]
    assert len(warnings_) == 1 and 'No space left on device' in warnings_[0], warnings_
    assert torch.load(tmp_path / 'training-state.pt', weights_only=True)['nimg'] == 64


def test_short_toy_distillation_lowers_fd(tmp_path):
    # SiDA from the shipped teacher (toy/ddpmpp/teacher.pt) for 3 kimg at the SiD run's learning rates (the
    # claims' SiDA runs), measured on 1000 samples.
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--preset', 'toy', '--method', 'sida', '--glr', '1e-4',
                        '--gen-start-kimg', '0.5', '--adv-start-kimg', '1', '--duration', '0.003', '--tick', '1', '--snap', '3', '--metrics', 'fd1k', '--outdir', str(tmp_path),
                        '--device', 'cpu'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    fds = [row['fd1k'] for row in rows if 'fd1k' in row]
    assert fds[-1] < 0.5 * fds[0], fds
    assert {'fd1k_data', 'fd1k_teacher35', 'fd1k_teacher17', 'acc1k_teacher17'} <= set(rows[0])
    # toy-comparison.png: 5 rows (real, the teacher's two samplers, initial, distilled) of 16 columns of 64-pixel tiles.
    assert PIL.Image.open(tmp_path / 'toy-comparison.png').size == (110 + 16 * 66, 5 * 68)


def write_dataset(folder, n, size, labels=None):
    """A folder of n random PNGs (write_pngs, below) with EDM's dataset.json labels when given."""
    write_pngs(folder, random_images(n, seed=0, size=size))
    if labels is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[f'{i:04d}.png', int(labels[i % len(labels)])] for i in range(n)]}, f)
    return str(folder)


@pytest.mark.parametrize('case, message', [
    ('resolution', '(3, 8, 8)'),
    ('unlabeled', 'class labels'),
    ('labels beyond classes', 'teacher has 4 classes'),
])
def test_data_that_does_not_fit_the_teacher_is_refused(tiny_teacher, tmp_path, case, message):
    data = {'resolution': lambda: write_dataset(tmp_path / 'd', 4, 8, labels=[0]),
            'unlabeled': lambda: write_dataset(tmp_path / 'd', 4, 16),
            'labels beyond classes': lambda: write_dataset(tmp_path / 'd', 4, 16, labels=[0, 9])}[case]()
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--teacher', tiny_teacher, '--data', data,
                        '--cond', '--metrics', 'none', '--device', 'cpu', '--outdir', str(tmp_path / 'out')],
                       capture_output=True, text=True)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / 'out' / 'training-state.pt')


def test_new_run_refuses_to_overwrite_an_existing_one(tiny_teacher, tmp_path):
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000008')
    before = (tmp_path / 'training-state.pt').read_bytes()
    r = run_sida(tmp_path, tiny_teacher, '--duration', '0.000008', check=False)
    assert r.returncode == 1 and '--resume' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / 'training-state.pt').read_bytes() == before


def write_latent_zip(path, n=6, channels=4, res=8, labels=True, std=0):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, 'w') as z:
        names = []
        for i in range(n):
            spread = rng.uniform(0.5, 1.5, (channels, res, res)) * std if std else np.zeros((channels, res, res))
            mean_std = np.concatenate([rng.normal(5, 4, (channels, res, res)), spread])
            buf = io.BytesIO()
            np.save(buf, mean_std.astype(np.float32))
            names.append(f'00000/img{i:08d}.npy')
            z.writestr(names[-1], buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [[m, i % 3] for i, m in enumerate(names)] if labels else None}))
    return str(path)


@pytest.mark.parametrize('kind', ['folder', 'latent zip'])
def test_a_cut_dataset_json_is_reported_as_cut_not_as_having_no_labels(tmp_path, kind):
    text = json.dumps({'labels': [[f'{i:04d}.png', 0] for i in range(4)]})[:30]
    if kind == 'folder':
        write_dataset(tmp_path / 'd', 4, 16)
        (tmp_path / 'd' / 'dataset.json').write_text(text)
        load = lambda: fid.ImageDataset(str(tmp_path / 'd'))
    else:
        write_latent_zip(tmp_path / 'l.zip')
        with zipfile.ZipFile(tmp_path / 'l.zip') as src, zipfile.ZipFile(tmp_path / 'cut.zip', 'w') as dst:
            for name in src.namelist():
                dst.writestr(name, text if name == 'dataset.json' else src.read(name))
        load = lambda: networks.LatentData(str(tmp_path / 'cut.zip'))
    with pytest.raises(UserError) as error:
        load()
    message = str(error.value)
    assert 'dataset.json is not valid JSON (truncated' in message and 'no "labels"' not in message and '\n' not in message


def test_latent_zip_reads_and_normalises_like_edm2(tmp_path):
    path = write_latent_zip(tmp_path / 'latents.zip', std=2)
    images, labels = sida.load_dataset(path, 8, 4, latent=True)
    assert isinstance(images, networks.LatentData) and len(images) == 6 and labels.tolist() == [0, 1, 2, 0, 1, 2]
    sampler = sida.Sampler(images, labels, 3, (4, 8, 8), torch.device('cpu'))
    slot = sida.Slot(0, 0, torch.device('cpu'))
    x, c = sampler.real(slot, 5)
    slot = sida.Slot(0, 0, torch.device('cpu'))
    idx = sampler.draw(slot, 5)                    # the same draws: the index, then eps
    mean, std = images[idx][:, :4], images[idx][:, 4:]
    raw = mean + std * torch.randn(mean.shape, generator=slot.gen)
    stats = lambda v: torch.tensor(v).view(1, 4, 1, 1)
    expect = (raw - stats(networks.LATENT_MEAN)) * (0.5 / stats(networks.LATENT_STD))
    assert std.min() >= 1 and torch.allclose(x, expect, atol=1e-5)
    assert (raw - mean).abs().mean() > 1                  # the sample is not the mean
    assert torch.equal(c.argmax(1), labels[idx])
    assert torch.allclose(networks.denormalize_latents(x), raw, atol=1e-4)


def test_latent_statistics_are_edm2s():
    """The published raw-latent statistics of EDM2's ImageNet 512 VAE latents (SPEC), written out here."""
    assert networks.LATENT_MEAN == (5.81, 3.25, 0.12, -2.15) and networks.LATENT_STD == (4.17, 4.62, 3.71, 3.28)
    assert networks.LATENT_FINAL_STD == 0.5


def test_latent_zip_of_the_wrong_size_is_refused(tmp_path):
    path = write_latent_zip(tmp_path / 'latents.zip', res=4)
    with pytest.raises(networks.UserError, match='latents are'):
        sida.load_dataset(path, 8, 4, latent=True)
    with open(tmp_path / 'bad.zip', 'wb') as f:
        f.write(b'not a zip')
    with pytest.raises(networks.UserError, match='not an EDM2 latent zip'):
        sida.load_dataset(str(tmp_path / 'bad.zip'), 8, 4, latent=True)


@pytest.mark.parametrize('damage, message', [
    (b'', 'img00000003.npy is not a readable .npy file (EOFError)'),
    (np.zeros((8, 4, 4), np.float32), 'img00000003.npy is not of the shape of the first latents, [4, 8, 8] x 2'),
    (np.zeros((2, 2), object), 'img00000003.npy is not a readable .npy file (ValueError)')])   # a pickle inside
def test_a_damaged_latent_file_is_named_in_one_line_when_drawn(tmp_path, damage, message):
    """ImageNet's latents are read on demand: a damaged file deep in the zip fails when drawn, naming itself."""
    path = write_latent_zip(tmp_path / 'latents.zip')
    buf = io.BytesIO()
    if isinstance(damage, np.ndarray):
        np.save(buf, damage, allow_pickle=True)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files['00000/img00000003.npy'] = buf.getvalue()
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in files.items():
            z.writestr(name, data)
    images, _ = sida.load_dataset(path, 8, 4, latent=True)
    assert images[torch.tensor([0, 1])].shape == (2, 8, 8, 8)
    with pytest.raises(networks.UserError, match=re.escape(message)):
        images[torch.tensor([2, 3])]


def test_the_vae_sees_at_most_vae_batch_images_per_call_and_the_result_is_the_same():
    """A 512x512 decode of a training run's 64-256 latents at once would not fit on a GPU."""
    vae, n = LinearVAE(), 2 * networks.VAE_BATCH + 3
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    latents = networks.encode_images(vae, images)
    decoded = networks.decode_latents(vae, networks.normalize_latents(latents[:, :4]))
    assert [len(x) for x in vae.inputs] == [len(y) for y in vae.outputs] == [8, 8, 3]
    whole = LinearVAE()
    torch.testing.assert_close(latents, torch.cat([whole.encode(images.float() / 255).latent_dist.mean,
                                                   torch.full((n, 1, 8, 8), 0.1).expand(n, 4, 8, 8)], dim=1))
    assert (images.int() - decoded.int()).abs().max() <= 1


def test_encode_latents_writes_an_edm2_latent_zip_with_labels(tmp_path, monkeypatch, capsys):
    tiny_vae().save_pretrained(str(tmp_path / 'vae'))
    images = write_dataset(tmp_path / 'images', 5, 16, labels=[2, 0, 1])
    dest = str(tmp_path / 'latents.zip')
    r = subprocess.run([sys.executable, os.path.join(HERE, 'networks.py'), 'encode-latents', images, dest,
                        '--vae', str(tmp_path / 'vae'), '--device', 'cpu'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = networks.LatentData(dest)
    assert len(data) == 5 and data.shape == (4, 8, 8) and data.labels.tolist() == [2, 0, 1, 2, 0]
    assert (data[torch.arange(5)][:, 4:] > 0).all()            # the stored std of the VAE posterior
    r = subprocess.run([sys.executable, os.path.join(HERE, 'networks.py'), 'encode-latents', images, dest,
                        '--vae', str(tmp_path / 'vae'), '--device', 'cpu'], capture_output=True, text=True)
    assert r.returncode == 1 and 'not overwriting' in r.stderr and len(r.stderr.splitlines()) == 1
    other, encode = tmp_path / 'other.zip', networks.encode_images     # a DEST made by another program meanwhile
    monkeypatch.setattr(networks, 'encode_images', lambda *a: other.write_bytes(b'theirs') and encode(*a))
    with pytest.raises(SystemExit) as e:
        networks.main(['encode-latents', images, str(other), '--vae', str(tmp_path / 'vae'), '--device', 'cpu'])
    assert e.value.code == 1 and other.read_bytes() == b'theirs' and len(networks.LatentData(tmp_path / 'other-1.zip')) == 5
    assert capsys.readouterr().err == f'error: {other} appeared while this was being written; not overwriting it: ' \
                                      f'the result is {tmp_path / "other-1.zip"}\n'


def test_encode_latents_of_a_missing_source_is_refused_before_the_vae_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(networks, 'load_vae', lambda *a, **k: pytest.fail('the VAE was loaded'))
    with pytest.raises(SystemExit) as e:
        networks.main(['encode-latents', str(tmp_path / 'missing'), str(tmp_path / 'latents.zip'), '--device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and 'missing: no such file' in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_edm2_sida_runs_in_latent_space_with_forced_weight_normalisation(tmp_path):
    torch.manual_seed(0)
    teacher = networks.build_network({'class_name': 'EDM2Precond', 'kwargs': dict(
        img_resolution=8, img_channels=4, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[4], logvar_channels=8)})
    networks.save_network(teacher, str(tmp_path / 'teacher.pt'))
    data = write_latent_zip(tmp_path / 'latents.zip')
    tiny_vae().save_pretrained(str(tmp_path / 'vae'))
    r = subprocess.run([sys.executable, os.path.join(HERE, 'sida.py'), '--teacher', str(tmp_path / 'teacher.pt'),
                        '--data', data, '--vae', str(tmp_path / 'vae'), '--cond', '--batch', '4', '--duration', '0.000016', '--gen-start-kimg', '0',
                        '--adv-start-kimg', '0', '--tick', '0.004', '--metrics', 'none', '--device', 'cpu',
                        '--lr', '1e-2', '--glr', '1e-2', '--dropout', '0', '--outdir', str(tmp_path / 'run')],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr
    state = torch.load(tmp_path / 'run' / 'training-state.pt', weights_only=True)
    for key, w in state['nets']['G'].items():
        if w.ndim >= 2:                                    # MP layers: unit RMS per output channel after steps
            rms = w.flatten(1).square().mean(dim=1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=0.05), key
    assert 'logvar_linear.weight' not in state['nets']['G'] and 'logvar_linear.weight' in state['nets']['fake_score']
    with PIL.Image.open(tmp_path / 'run' / 'samples-000000.016.png') as grid:    # decoded by the VAE: 16x16 images
        assert grid.size == (256, 256)


def mp_weight_rms(net):
    return torch.cat([m.weight.flatten(1).square().mean(dim=1).sqrt() for m in net.modules()
                      if isinstance(m, networks.MPConv)])


def test_forced_normalisation_renormalises_the_generator_and_not_the_fake_score():
    """As upstream's EDM2 runs: G's stored weights are renormalised before its training pass; the fake score
    network's never (its hook stays on the teacher copy)."""
    s = bench_sida('edm2', '--lr', '0', '--glr', '0')          # lr 0: only the renormalisation moves weights
    with torch.no_grad():
        for net in (s.G, s.fake_score):
            for m in net.modules():
                if isinstance(m, networks.MPConv):
                    m.weight.mul_(3)
    slots = [sida.Slot(0, 0, torch.device('cpu'))]
    s.fake_score_step(slots)
    s.generator_step(slots, use_adv=True)
    assert torch.allclose(mp_weight_rms(s.G), torch.ones(1), atol=1e-3)
    assert not torch.allclose(mp_weight_rms(s.fake_score), torch.ones(1), atol=1e-3)


def test_bench_runs_on_cpu():
    r = subprocess.run([sys.executable, os.path.join(HERE, 'bench.py'), '--arch', 'ddpmpp',
                        '--resolution', '8', '--cbase', '8', '--cres', '1,2', '--batch-gpu', '2', '--iters', '1',
                        '--device', 'cpu', '--profile'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result['img_per_s'] > 0 and result['gflop_per_iter'] > 0 and 'compile_s' not in result   # compiled runs only
    assert result['eager_ops_per_iter'] > 1000          # two updates of networks with dozens of layers each
    # --profile: a summary line, then 20 operators by share, the largest first
    head = next(i for i, line in enumerate(lines) if line.startswith('profile: operators (self time) busy'))
    shares = [float(line.split('%')[0]) for line in lines[head + 1:head + 21]]
    assert len(shares) == 20 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01


# ===================================================================================================
# fid.py: statistics, distances, datasets, the command line, generator evaluation
# ===================================================================================================

class StandInDetector(torch.nn.Module):
    """Same call as inception-2015-12-05.pt: uint8 [N, 3, H, W] -> features [N, dim] or probabilities [N, 1008]."""

    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(dim)
        self.register_buffer('proj', torch.randn([48, dim], generator=g) / 4)
        self.register_buffer('classes', torch.randn([dim, 1008], generator=g) / dim ** 0.5)

    def forward(self, x, return_features: bool = False, no_output_bias: bool = False):
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise ValueError('expected uint8 images [N, 3, H, W]')
        features = torch.tanh(F.adaptive_avg_pool2d(x.to(torch.float32) / 255, 4).flatten(1) @ self.proj)
        if return_features:
            return features
        return torch.softmax(features @ self.classes, dim=1)


@pytest.fixture(scope='module')
def detectors(tmp_path_factory):
    """Paths of scripted stand-ins: 2048-d like Inception, and 64-d to keep the matrix square roots cheap."""
    folder = tmp_path_factory.mktemp('detectors')
    paths = {}
    for dim in (2048, 64):
        paths[dim] = str(folder / f'stand-in-{dim}.pt')
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='`torch.jit')     # deprecated (torch 2.14: FutureWarning)
            torch.jit.save(torch.jit.script(StandInDetector(dim)), paths[dim])
    return paths


def test_reference_statistics_of_other_features_are_refused_before_the_run_starts(tiny_teacher, detectors, tmp_path, capsys):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(SystemExit) as e:
        sida.main(tiny_run_argv(tmp_path / 'out', tiny_teacher, '--metrics', 'fid1k', '--ref', str(tmp_path / 'ref.npz'),
                                '--detector', detectors[2048]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and '--ref statistics are 64-dimensional but the detector gives 2048-dimensional features' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def random_images(n, seed, channels=3, size=8):
    return np.random.default_rng(seed).integers(0, 256, [n, channels, size, size], dtype=np.uint8)


def write_pngs(folder, images, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        name = names[i] if names else f'{i:04d}.png'
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(os.path.join(folder, name))


def numpy_stats(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def run_cli(argv, capsys):
    code = fid.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def small_generator(label_dim=0):
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type='SongUNet',
                               model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]).eval()

# ----------------------------------------------------------------------------------------------------
# Statistics and distances.

def test_frechet_distance_of_gaussians_equals_closed_form():
    rng = np.random.default_rng(0)
    d = 32
    a, b = rng.standard_normal([d, d]), rng.standard_normal([d, d])
    sigma1, sigma2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)   # do not commute
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)

    def sym_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    root1 = sym_sqrt(sigma1)
    # W2^2 between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * sym_sqrt(root1 @ sigma2 @ root1))
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_is_sum_of_square_root_differences():
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_streamed_statistics_equal_numpy_mean_and_covariance():
    features = (np.random.default_rng(1).standard_normal([301, 16]) * 3 + 50).astype(np.float32)  # large mean
    stats = fid.FeatureStats()
    for chunk in np.array_split(features, [7, 8, 150]):                      # uneven batches, one of size 1
        stats.update(torch.from_numpy(chunk))                                 # float32 like a detector's output
    features = features.astype(np.float64)
    mu, sigma = stats.mean_cov()
    ref_mu, ref_sigma = numpy_stats(features)
    assert stats.num == 301 and mu.dtype == np.float64
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-9)


def test_statistics_of_wrong_size_are_refused():
    with pytest.raises(networks.UserError, match='different sizes'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    stats = fid.FeatureStats(8)
    with pytest.raises(networks.UserError, match='8'):
        stats.update(torch.zeros([2, 9]))


def test_inception_score_of_confident_balanced_predictions_is_number_of_classes():
    probs = np.full([100, 1008], 1e-9)
    probs[np.arange(100), np.arange(100) % 5] = 1
    probs /= probs.sum(axis=1, keepdims=True)
    mean, std = fid.inception_score(probs)
    assert mean == pytest.approx(5, rel=1e-4) and std == pytest.approx(0, abs=1e-4)


def test_inception_score_is_the_mean_and_std_over_ten_consecutive_splits():
    """Split k of 10 confidently predicts m_k balanced classes, so its score is m_k."""
    m = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12]
    probs = np.full([8400, 20], 1e-9)
    for k, classes in enumerate(m):
        rows = np.arange(840 * k, 840 * (k + 1))
        probs[rows, rows % classes] = 1
    probs /= probs.sum(axis=1, keepdims=True)
    mean, std = fid.inception_score(probs)
    assert mean == pytest.approx(5.8, rel=1e-4) and std == pytest.approx(np.std(m), rel=1e-4)


def test_inception_score_applies_softmax_to_logits():
    logits = np.random.default_rng(2).standard_normal([50, 20]) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert fid.inception_score(logits) == pytest.approx(fid.inception_score(probs), rel=1e-10)

# ----------------------------------------------------------------------------------------------------
# Reference files.

def test_load_ref_reads_npz_like_edm(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma)
    got_mu, got_sigma = fid.load_ref(str(tmp_path / 'ref.npz'))
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)


@pytest.mark.parametrize('damage', ['cut', 'corrupt'])
def test_damaged_npz_reference_is_reported_as_a_damaged_npz_not_a_pickle(tmp_path, damage):
    fid.save_ref(str(tmp_path / 'ref.npz'), np.arange(64.0), np.eye(64))
    data = (tmp_path / 'ref.npz').read_bytes()
    damaged = data[:len(data) // 2] if damage == 'cut' else data[:200] + bytes(400) + data[600:]
    (tmp_path / 'bad.npz').write_bytes(damaged)
    with pytest.raises(UserError) as error:
        fid.load_ref(str(tmp_path / 'bad.npz'))
    message = str(error.value)
    assert message.startswith('--ref') and 'damaged npz' in message and 'pickle' not in message and '\n' not in message


@pytest.mark.parametrize('mu, sigma, message', [
    (np.full(4, np.nan), np.eye(4), 'must be finite'),
    (np.zeros(4), -np.eye(4), 'a covariance'),
    (np.array(['a', 'b', 'c', 'd']), np.eye(4), 'not arrays of numbers'),
])
def test_reference_statistics_that_cannot_give_a_fid_are_refused(tmp_path, mu, sigma, message):
    """Such statistics once gave "fid: nan" (or a negative FID) and exit 0."""
    np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma)
    with pytest.raises(UserError) as error:
        fid.load_ref(str(tmp_path / 'ref.npz'))
    assert str(error.value).startswith(f'--ref {tmp_path / "ref.npz"}') and message in str(error.value)


def test_load_ref_reads_edm2_pickle_of_numpy_arrays(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 3
    for protocol in (3, 4, 5):
        path = tmp_path / f'img512-{protocol}.pkl'
        with open(path, 'wb') as f:
            pickle.dump({'fid': {'mu': mu, 'sigma': sigma}, 'fd_dinov2': {'mu': mu[:2], 'sigma': sigma[:2, :2]}},
                        f, protocol=protocol)
        got_mu, got_sigma = fid.load_ref(str(path))
        np.testing.assert_array_equal(got_mu, mu)
        np.testing.assert_array_equal(got_sigma, sigma)


def test_load_ref_refuses_pickle_that_names_other_globals(tmp_path):
    path = tmp_path / 'evil.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'fid': {'mu': os.getcwd, 'sigma': None}}, f)
    with pytest.raises(networks.UserError, match=rf'refusing to load .*{os.getcwd.__module__}.getcwd'):
        fid.load_ref(str(path))

def test_a_pickle_cannot_change_the_globals_it_is_handed(tmp_path):
    """BUILD on a global (here setting __defaults__ of torch's tensor rebuilder, which made every later tensor
    load in the process come back changed) is refused; the function stays as it was."""
    path = tmp_path / 'evil.pkl'
    path.write_bytes(b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__}X\x03\x00\x00'
                     b'\x00neg\x88s\x85s\x86b0}.')
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    with pytest.raises(UserError, match='it would change function _rebuild_tensor_v2'):
        networks.load_network(str(path))
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults


def test_a_small_file_cannot_claim_a_large_network_or_array(tmp_path):
    """Sizes come from the file's data: tensors with zero strides over a tiny storage, and numpy arrays made
    with a size of their own instead of numpy's empty shell, are refused before anything is allocated."""
    torch.manual_seed(0)
    networks.save_network(networks.build_network(TINY), str(tmp_path / 'net.pt'))
    data = torch.load(tmp_path / 'net.pt', weights_only=True)
    data['state_dict'] = {k: torch.zeros(1, dtype=t.dtype).expand(t.shape) for k, t in data['state_dict'].items()}
    torch.save(data, tmp_path / 'strided.pt')
    with pytest.raises(UserError, match='tensors larger than their data in the file'):
        networks.load_network(str(tmp_path / 'strided.pt'))
    big = (b'\x80\x02}X\x03\x00\x00\x00fid}(X\x02\x00\x00\x00mucnumpy.core.multiarray\n_reconstruct\ncnumpy\n'
           b'ndarray\nJ\x00\xe1\xf5\x05\x85C\x01O\x87RX\x05\x00\x00\x00sigmaK\x00us.')   # 10^8 objects, 97 bytes
    (tmp_path / 'ref.pkl').write_bytes(big)
    with pytest.raises(UserError, match='not made as numpy pickles arrays'):
        fid.load_ref(str(tmp_path / 'ref.pkl'))


def test_a_network_file_with_an_entry_that_is_not_a_tensor_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    networks.save_network(networks.build_network(TINY), str(tmp_path / 'net.pt'))
    data = torch.load(tmp_path / 'net.pt', weights_only=True)
    name = next(iter(data['state_dict']))
    data['state_dict'][name] = [0.0] * 4
    torch.save(data, tmp_path / 'list.pt')
    with pytest.raises(UserError, match=f'state_dict entries that are not tensors: {re.escape(name)}$'):
        networks.load_network(str(tmp_path / 'list.pt'))


def test_network_arguments_no_real_file_has_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    networks.save_network(networks.build_network(TINY), str(tmp_path / 'net.pt'))
    data = torch.load(tmp_path / 'net.pt', weights_only=True)
    data['config']['kwargs']['model_channels'] = 0
    torch.save(data, tmp_path / 'bad.pt')
    with pytest.raises(UserError) as error:
        networks.load_network(str(tmp_path / 'bad.pt'))
    assert '\n' not in str(error.value) and 'bad.pt' in str(error.value)


# ----------------------------------------------------------------------------------------------------
# Reading datasets.

def py2_cifar_batch(data, labels):
    """A CIFAR-10 batch pickled the way the real file is (Python 2 cPickle, protocol 2, numpy.core names)."""
    def s(b):
        return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<i', len(b)) + b

    def i(v):
        return b'K' + bytes([v]) if 0 <= v < 256 else b'M' + struct.pack('<H', v) if 0 <= v < 65536 else b'J' + struct.pack('<i', v)
    p = b'\x80\x02}(' + s(b'batch_label') + s(b'training batch')
    p += s(b'labels') + b'](' + b''.join(i(int(v)) for v in labels) + b'e'
    p += s(b'data') + b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n' + i(0) + b'\x85' + s(b'b') + b'\x87R'
    p += b'(' + i(1) + i(len(data)) + i(3072) + b'\x86cnumpy\ndtype\n' + s(b'u1') + i(0) + i(1) + b'\x87R'
    p += b'(' + i(3) + s(b'|') + b'NNN' + i(-1) + i(-1) + i(0) + b'tb'
    return p + b'\x89' + s(data.tobytes()) + b'tbu.'


def test_cifar10_tarball_is_read_with_labels(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, [5, 4, 3072], dtype=np.uint8)
    labels = rng.integers(0, 10, [5, 4])
    path = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        for k in range(5):
            blob = py2_cifar_batch(data[k], labels[k])
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k + 1}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    images, got_labels = fid.load_images(str(path))
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, data.reshape(20, 3, 32, 32))   # R, G, B planes of 32x32
    np.testing.assert_array_equal(got_labels, labels.reshape(20))


def test_a_cifar_tarball_whose_batch_is_a_link_is_refused(tmp_path):
    path = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        tar.addfile(_link('cifar-10-batches-py/data_batch_1', '/etc/passwd'))
    with pytest.raises(UserError, match='without data_batch'):
        fid.load_images(str(path))


def _link(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize('keep', [100, 2000])
def test_a_cifar_tarball_cut_short_is_refused_in_one_line(tmp_path, keep):
    path = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        noise = np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes()     # so that gzip cannot shrink it
        blob = py2_cifar_batch(np.zeros([4, 3072], np.uint8), [0, 1, 2, 3]) + noise
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(UserError) as error:
        fid.load_images(str(path))
    assert 'damaged tarball' in str(error.value) and str(path) in str(error.value)


def test_zip_dataset_labels_follow_dataset_json(tmp_path):
    images = random_images(3, seed=4)
    path = tmp_path / 'data.zip'
    names = ['00000/img00000002.png', '00000/img00000000.png', '00000/img00000001.png']
    with zipfile.ZipFile(path, 'w') as z:
        for name, image in zip(names, images):
            buffer = io.BytesIO()
            PIL.Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format='png')
            z.writestr(name, buffer.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [[n, k + 7] for k, n in enumerate(names)]}))
    got, labels = fid.load_images(str(path))
    np.testing.assert_array_equal(got, images[[1, 2, 0]])                 # sorted by name
    np.testing.assert_array_equal(labels, [8, 9, 7])


def test_folder_is_read_recursively_in_name_order_with_grayscale(tmp_path):
    images = random_images(3, seed=5, channels=1)
    write_pngs(tmp_path / 'data', images, ['b/1.png', 'a/2.png', 'c.png'])
    got, labels = fid.load_images(str(tmp_path / 'data'))
    assert got.shape == (3, 1, 8, 8) and labels is None
    np.testing.assert_array_equal(got, images[[1, 0, 2]])

# ----------------------------------------------------------------------------------------------------
# Command line.

def test_cli_ref_writes_inception_sized_statistics_equal_to_numpy(tmp_path, detectors, capsys):
    images = random_images(24, seed=6)
    write_pngs(tmp_path / 'data', images)
    code, out, err = run_cli(['ref', '--data', tmp_path / 'data', '--dest', tmp_path / 'ref.npz',
                              '--detector', detectors[2048], '--batch', 10, '--workers', 0], capsys)
    assert code == 0, err
    with torch.no_grad():
        features = fid.load_detector(detectors[2048])(torch.from_numpy(images), return_features=True).double().numpy()
    expected_mu, expected_sigma = numpy_stats(features)
    with np.load(tmp_path / 'ref.npz') as ref:
        assert ref['mu'].shape == (2048,) and ref['sigma'].shape == (2048, 2048)
        np.testing.assert_allclose(ref['mu'], expected_mu, atol=1e-6)       # float32 features, CPU or GPU
        np.testing.assert_allclose(ref['sigma'], expected_sigma, atol=1e-6)


def edm_subset(size, num):
    # EDM's ImageFolderDataset(max_size=num, random_seed=0): shuffle the indices with RandomState(0), keep num, sort.
    indices = np.arange(size)
    np.random.RandomState(0).shuffle(indices)
    return np.sort(indices[:num])


def test_num_of_a_dataset_is_edms_random_subset_in_file_order():
    """A dataset stored class by class must not be cut to its first classes."""
    assert fid.subset(40, 30) == edm_subset(40, 30).tolist()
    assert min(fid.subset(40, 20)) < 20 <= max(fid.subset(40, 20))
    assert fid.subset(40, None) == fid.subset(40, 40) == list(range(40))


def test_cli_calc_prints_fid_against_ref_written_by_cli_ref(tmp_path, detectors, capsys):
    real, fake = random_images(30, seed=10), random_images(40, seed=11) // 2    # darker: a clear distance
    write_pngs(tmp_path / 'real', real)
    write_pngs(tmp_path / 'fake', fake)
    code, out, err = run_cli(['ref', '--data', tmp_path / 'real', '--dest', tmp_path / 'ref.npz',
                              '--detector', detectors[64], '--workers', 0], capsys)
    assert code == 0, err
    fids = []
    for folder in ('real', 'fake'):
        code, out, err = run_cli(['calc', '--images', tmp_path / folder, '--ref', tmp_path / 'ref.npz', '--num', 30,
                                  '--detector', detectors[64], '--batch', 7], capsys)
        assert code == 0, err
        fids.append(float(out.splitlines()[-1].split()[-1]))          # the FID is the last word printed
    with torch.no_grad():
        features = [fid.load_detector(detectors[64])(torch.from_numpy(x), return_features=True).double().numpy()
                    for x in (real, fake[edm_subset(40, 30)])]
    assert fids[0] == pytest.approx(0, abs=1e-3)
    assert fids[1] == pytest.approx(fid.frechet_distance(*numpy_stats(features[1]), *numpy_stats(features[0])), rel=1e-4)
    assert fids[1] > 0.1


def test_cli_gen_evaluates_small_generator_checkpoint(tmp_path, detectors, capsys):
    G = small_generator()
    networks.save_network(G, str(tmp_path / 'G.pt'))
    real = random_images(40, seed=7)
    with torch.no_grad():
        features = fid.load_detector(detectors[64])(torch.from_numpy(real), return_features=True).double().numpy()
    np.savez(tmp_path / 'ref.npz', mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    code, out, err = run_cli(['gen', '--network', tmp_path / 'G.pt', '--ref', tmp_path / 'ref.npz', '--num', 20,
                              '--batch', 8, '--detector', detectors[64], '--outdir', tmp_path / 'out', '--is'], capsys)
    assert code == 0, err
    value = float(out.splitlines()[-1].split()[-1])
    generated = fid.generate_images(G, torch.arange(20))
    expected = fid.generator_metrics(lambda s: generated[s], 20, fid.load_detector(detectors[64]),
                                     ref=fid.load_ref(str(tmp_path / 'ref.npz')))['fid']
    assert value == pytest.approx(expected, abs=1e-4) and value > 0
    assert out.splitlines()[0].startswith('is (20 images):')
    saved = np.asarray(PIL.Image.open(tmp_path / 'out' / '000013.png')).transpose(2, 0, 1)
    np.testing.assert_array_equal(saved, generated[13].numpy())


@pytest.mark.parametrize('problem', ['empty folder', 'too few images', 'wrong size'])
def test_cli_bad_input_gives_one_line_error(tmp_path, detectors, capsys, problem):
    write_pngs(tmp_path / 'data', random_images(5, seed=8))
    os.makedirs(tmp_path / 'empty')
    np.savez(tmp_path / 'ref64.npz', mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / 'ref10.npz', mu=np.zeros(10), sigma=np.eye(10))
    images, num, ref = {'empty folder': ('empty', 5, 'ref64.npz'), 'too few images': ('data', 6, 'ref64.npz'),
                        'wrong size': ('data', 5, 'ref10.npz')}[problem]
    code, out, err = run_cli(['calc', '--images', tmp_path / images, '--ref', tmp_path / ref, '--num', num,
                              '--detector', detectors[64], '--workers', 0], capsys)
    assert code == 1 and out == ''
    assert len(err.splitlines()) == 1 and err.startswith('error: ')
    assert {'empty folder': 'no images', 'too few images': '--num 6', 'wrong size': '10-dimensional'}[problem] in err


def test_cli_error_exits_1_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), 'calc', '--images', str(tmp_path / 'none'),
                             '--ref', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'no-detector.pt')],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: ') and len(result.stderr.splitlines()) == 1

# ----------------------------------------------------------------------------------------------------
# Released generators and reference statistics by name, sampling without --ref, the progress bar.

# The release table (official SiD/SiDA README): data, method, alpha, file name.
RELEASES = [(data, method, alpha) for data in ['cifar10-uncond', 'cifar10-cond', 'imagenet64', 'ffhq64', 'afhq64']
            for method, alpha in [('sid', 1.2), ('sida', 1.0), ('sid2a', 1.0), ('sid2a', 1.2)]] + \
           [(f'edm2-img512-{size}', method, 1.0) for size in ['xs', 's', 'm', 'l', 'xl', 'xxl'] for method in ['sid', 'sida', 'sid2a']
            if (size, method) != ('xxl', 'sid2a')]
# FID-50k as published: data -> (SiD, best of SiDA / SiD²A).
PAPER_FID = {'cifar10-uncond': (1.923, 1.499), 'cifar10-cond': (1.710, 1.396), 'imagenet64': (1.524, 1.110),
             'ffhq64': (1.550, 1.040), 'afhq64': (1.628, 1.276), 'edm2-img512-xs': (None, 2.156),
             'edm2-img512-s': (None, 1.669), 'edm2-img512-m': (None, 1.488), 'edm2-img512-l': (None, 1.413),
             'edm2-img512-xl': (None, 1.379), 'edm2-img512-xxl': (None, 1.366)}
REFS = {'cifar10-32x32': 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz',
        'imagenet-64x64': 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz',
        'ffhq-64x64': 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/ffhq-64x64.npz',
        'afhqv2-64x64': 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/afhqv2-64x64.npz',
        'img512': 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl'}


def release_name(data, method, alpha):
    default_alpha = 1.2 if method == 'sid' and not data.startswith('edm2') else 1.0
    return f'{method}-{data}' + ('' if alpha == default_alpha else f'-alpha{alpha}')


def test_every_release_has_a_regular_name_and_a_huggingface_url():
    names = [release_name(*row) for row in RELEASES]
    assert len(names) == 37 and list(networks.RELEASED_URLS) == names
    urls = list(networks.RELEASED_URLS.values())
    assert len(set(urls)) == 37 and all(u.startswith('https://huggingface.co/UT-Austin-PML/SiD') for u in urls)
    for (data, method, alpha), url in zip(RELEASES, urls):
        file = url.rsplit('/', 1)[1]
        if method == 'sid' and not data.startswith('edm2'):
            assert url.startswith('https://huggingface.co/UT-Austin-PML/SiD/resolve/main/'), url
            continue
        # The file name carries the method and alpha, except the two the release table lists under another method.
        odd = {('edm2-img512-xl', 'sida'): 'sid2a', ('edm2-img512-xxl', 'sid'): 'sida'}.get((data, method), method)
        assert f'_{odd}_alpha{alpha:g}-' in file, (data, method, file)


def test_names_command_lists_releases_with_the_published_fid_and_every_reference(capsys):
    code, out, err = run_cli(['names'], capsys)
    assert code == 0 and err == ''
    lines = out.splitlines()
    for data, method, alpha in RELEASES:
        line = next(l for l in lines if l.split()[:1] == [release_name(data, method, alpha)])
        sid_fid, best_fid = PAPER_FID[data]
        own = f'{sid_fid:.3f}' if method == 'sid' and sid_fid is not None else '-'   # SiDA/SiD²A: per data set only
        assert line.split()[2:] == [own, f'{best_fid:.3f}'], line
    for name, url in REFS.items():
        assert any(l.split() == [name, url] for l in lines), name
    assert fid.REF_URLS == REFS
    assert 'sid2a' in out and 'no EDM2-XXL SiD²A' in out                      # the table's oddities are stated
    assert run_cli(['--list'], capsys)[1] == out


@pytest.fixture
def released(tmp_path, monkeypatch, detectors):
    """'sida-cifar10-uncond' and 'cifar10-32x32' pointing at file:// stand-ins, a fresh download cache."""
    G = small_generator()
    networks.save_network(G, str(tmp_path / 'served-G.pt'))
    real = random_images(40, seed=7)
    with torch.no_grad():
        features = fid.load_detector(detectors[64])(torch.from_numpy(real), return_features=True).double().numpy()
    np.savez(tmp_path / 'served-ref.npz', mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    monkeypatch.setitem(networks.RELEASED_URLS, 'sida-cifar10-uncond', (tmp_path / 'served-G.pt').as_uri())
    monkeypatch.setitem(fid.REF_URLS, 'cifar10-32x32', (tmp_path / 'served-ref.npz').as_uri())
    monkeypatch.setenv('SIDA_CACHE', str(tmp_path / 'cache'))
    return G, tmp_path


def test_gen_resolves_release_and_reference_names_and_downloads_once(released, detectors, capsys):
    G, tmp_path = released
    argv = ['gen', '--network', 'sida-cifar10-uncond', '--ref', 'cifar10-32x32', '--num', 20, '--batch', 8,
            '--detector', detectors[64]]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    generated = fid.generate_images(G, torch.arange(20))
    expected = fid.generator_metrics(lambda s: generated[s], 20, fid.load_detector(detectors[64]),
                                     ref=str(tmp_path / 'served-ref.npz'))
    assert out.splitlines()[-1] == f'fid (20 images): {expected["fid"]:.4f}'
    assert out.splitlines()[0].startswith('is (20 images):')          # CIFAR-10: the paper reports IS
    assert sorted(p.suffix for p in (tmp_path / 'cache').iterdir()) == ['.npz', '.pt']
    (tmp_path / 'served-G.pt').unlink()
    (tmp_path / 'served-ref.npz').unlink()
    assert run_cli(argv, capsys)[1] == out                              # from the cache


def test_gen_trials_are_the_official_protocol_one_line_each_then_the_spread(released, detectors, capsys):
    """--trials N: FID of N sets of --num images from consecutive seeds, each printed, then mean, std, min, max
    (and the same for the Inception Score, which CIFAR-10's releases report)."""
    G, tmp_path = released
    code, out, err = run_cli(['gen', '--network', 'sida-cifar10-uncond', '--ref', 'cifar10-32x32', '--num', 10,
                              '--batch', 4, '--detector', detectors[64], '--trials', 3], capsys)
    assert code == 0, err
    detector, ref = fid.load_detector(detectors[64]), fid.load_ref(str(tmp_path / 'served-ref.npz'))
    fids = [fid.generator_metrics(lambda s: fid.generate_images(G, s), 10, detector, ref=ref,
                                  seeds=range(10 * k, 10 * k + 10))['fid'] for k in range(3)]
    lines = out.splitlines()
    for k in range(3):
        assert f'trial {k + 1}/3, seeds {10 * k}-{10 * k + 9}: fid (10 images): {fids[k]:.4f}' in lines
    v = np.array(fids)
    assert (f'fid over 3 trials of 10 images: mean {v.mean():.4f} std {v.std(ddof=1):.4f} '
            f'min {v.min():.4f} max {v.max():.4f}') in lines
    assert lines[-1].startswith('is over 3 trials of 10 images: mean ')
    assert len(set(np.round(fids, 6))) == 3                              # the trials draw different images
    code, out, err = run_cli(['gen', '--network', 'sida-cifar10-uncond', '--outdir', tmp_path / 'o', '--trials', 2], capsys)
    assert code == 1 and '--trials 2: FID only' in err and not (tmp_path / 'o').exists()


def test_load_network_resolves_a_released_name(released):
    G, _ = released
    net = networks.load_network('sida-cifar10-uncond')
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 2.5), G(x, 2.5), rtol=0, atol=0)


@pytest.mark.parametrize('argv, message', [
    (['gen', '--network', 'sida-cifar10-uncnd', '--outdir', 'out'], '--network sida-cifar10-uncnd: no such file, nor a known network name'),
    (['gen', '--network', 'sida-cifar10-uncnd', '--ref', 'cifar10-32x32'], '--network sida-cifar10-uncnd: no such file'),
    (['gen', '--network', 'sida-cifar10-uncond', '--ref', 'cifar10'], '--ref cifar10: no such file, nor a known name'),
    (['gen', '--network', 'sida-cifar10-uncond'], 'pass --ref to measure FID, --outdir to save images'),
])
def test_unknown_names_and_nothing_to_do_are_one_line_errors(released, capsys, argv, message):
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and out == '' and len(err.splitlines()) == 1 and message in err
    assert not (released[1] / 'cache').exists()                         # nothing downloaded


@pytest.mark.parametrize('argv, message', [
    (['gen', '--network', 'G.pt', '--outdir', 'o', '--init-sigma', '-1'], '--init-sigma -1.0: must be a positive noise level'),
    (['gen', '--network', 'G.pt', '--outdir', 'o', '--init-sigma', 'nan'], '--init-sigma nan'),
    (['gen', '--network', 'G.pt', '--outdir', 'a-file'], '--outdir a-file: not a folder'),
    (['ref', '--data', 'd', '--dest', 'a-folder'], '--dest a-folder: a folder, not a file name'),
    (['ref', '--data', 'd', '--dest', 'a-file'], '--dest a-file exists: remove it or choose another name'),
])
def test_fid_flags_that_cannot_work_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a-file').write_text('mine')
    (tmp_path / 'a-folder').mkdir()
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and message in err
    assert (tmp_path / 'a-file').read_text() == 'mine' and os.listdir(tmp_path / 'a-folder') == []


def test_gen_without_ref_writes_the_images_and_a_grid_beside_them(tmp_path, capsys, monkeypatch):
    G = small_generator(label_dim=10)
    networks.save_network(G, str(tmp_path / 'G.pt'))
    monkeypatch.setattr(fid, 'load_detector', lambda *a, **k: pytest.fail('sampling must not load the detector'))
    code, out, err = run_cli(['gen', '--network', tmp_path / 'G.pt', '--seeds', '3-12', '--batch', 4,
                              '--outdir', tmp_path / 'out'], capsys)
    assert code == 0, err
    expected = fid.generate_images(G, torch.arange(3, 13))
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{s:06d}.png' for s in range(3, 13)]   # calc --images reads them all
    for i, seed in enumerate(range(3, 13)):
        saved = np.asarray(PIL.Image.open(tmp_path / 'out' / f'{seed:06d}.png')).transpose(2, 0, 1)
        np.testing.assert_array_equal(saved, expected[i].numpy())
    grid = np.asarray(PIL.Image.open(tmp_path / 'out-grid.png'))
    scale = 256 // (4 * 8)                                              # 4 x 3 cells of 8x8, enlarged
    assert grid.shape == (3 * 8 * scale, 4 * 8 * scale, 3)
    np.testing.assert_array_equal(grid[8 * scale:16 * scale:scale, 8 * scale:16 * scale:scale].transpose(2, 0, 1),
                                  expected[5].numpy())                  # row 1, column 1: the sixth seed


def test_gen_without_ref_defaults_to_64_seeds(tmp_path, capsys):
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    code, out, err = run_cli(['gen', '--network', tmp_path / 'G.pt', '--outdir', tmp_path / 'out'], capsys)
    assert code == 0, err
    assert len(os.listdir(tmp_path / 'out')) == 64


def test_gen_keeps_the_images_and_grid_of_another_gen_into_the_same_folder(tmp_path, capsys, monkeypatch):
    # Two gens started at once into one empty folder both pass the start's check; each file the other wrote
    # first is kept, and the second stops, naming where its own went.
    out = tmp_path / 'out'
    os.makedirs(out)
    (out / '000001.png').write_bytes(b'another gen')
    with pytest.raises(UserError, match=re.escape(f'{out / "000001.png"} appeared while this was being written; '
                                                  f'not overwriting it: the result is {out / "000001-1.png"}')):
        fid.save_images(torch.from_numpy(random_images(3, seed=0)), [0, 1, 2], str(out))
    assert (out / '000001.png').read_bytes() == b'another gen'
    assert sorted(os.listdir(out)) == ['000000.png', '000001-1.png', '000001.png']
    shutil.rmtree(out)
    generate = fid.generate_images                       # the grid: the other gen's appears during this one

    def generate_then_the_other_grid(*args, **kwargs):
        (tmp_path / 'out-grid.png').write_bytes(b'another grid')
        return generate(*args, **kwargs)
    monkeypatch.setattr(fid, 'generate_images', generate_then_the_other_grid)
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    code, _, err = run_cli(['gen', '--network', tmp_path / 'G.pt', '--seeds', '0-3', '--outdir', out], capsys)
    assert code == 1 and err.splitlines()[-1] == (f'error: {tmp_path / "out-grid.png"} appeared while this was being '
                                                  f'written; not overwriting it: the result is {tmp_path / "out-grid-1.png"}')
    assert (tmp_path / 'out-grid.png').read_bytes() == b'another grid' and len(os.listdir(out)) == 4


def test_gen_without_ref_decodes_edm2_latent_generators_with_the_vae(tmp_path, capsys, monkeypatch):
    vae = LinearVAE()
    monkeypatch.setattr(networks, 'load_network', lambda source, device='cpu': LatentG())
    monkeypatch.setattr(networks, 'load_vae', lambda source, device='cpu': vae)
    (tmp_path / 'edm2.pkl').write_bytes(b'')                            # named by a file; its content is LatentG
    code, out, err = run_cli(['gen', '--network', tmp_path / 'edm2.pkl', '--seeds', '0-3', '--outdir', tmp_path / 'out'],
                             capsys)
    assert code == 0, err
    assert len(vae.outputs) == 1                                        # one batch of 4, decoded once
    saved = np.asarray(PIL.Image.open(tmp_path / 'out' / '000002.png')).transpose(2, 0, 1)
    assert saved.shape == (3, 8, 8)
    np.testing.assert_array_equal(saved, fid.generate_images(LatentG(), [2], device='cpu', vae=vae)[0].numpy())


def test_progress_bar_shows_images_throughput_and_eta(monkeypatch, capsys):
    monkeypatch.setattr(fid, 'PROGRESS_SECONDS', 0)
    fid.generator_metrics(toy_generate, 12, toy.Classifier(), batch=5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith('generating [') and '5/12 images (41%)' in lines[0] and 'img/s, ETA 0m 0' in lines[0]
    assert lines[-1].startswith('generating [' + '#' * 30 + ']') and '12/12 images (100%)' in lines[-1] and 'took' in lines[-1]


def test_short_work_prints_no_progress(capsys):
    fid.generator_metrics(toy_generate, 12, toy.Classifier(), batch=5)
    assert capsys.readouterr().err == ''


class LinearVAE(torch.nn.Module):
    """An exact, linear stand-in for the SD VAE (same resolution in and out) that records its inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([4.0, 3.0, -5.0]).view(1, 3, 1, 1))
        self.inputs, self.outputs = [], []

    def encode(self, x):
        self.inputs.append(x.clone())
        mean = torch.cat([x * self.scale + 1, x.mean(dim=1, keepdim=True)], dim=1)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1)))

    def decode(self, z):
        y = (z[:, :3] - 1) / self.scale
        self.outputs.append(y.clone())
        return types.SimpleNamespace(sample=y)


def test_vae_gets_pixels_in_0_1_like_edm2():
    vae = LinearVAE()
    images = torch.arange(256, dtype=torch.uint8).repeat(3).view(1, 3, 16, 16)
    networks.encode_images(vae, images)
    torch.testing.assert_close(vae.inputs[0], images.float() / 255, rtol=0, atol=0)
    assert vae.inputs[0].min() == 0 and vae.inputs[0].max() == 1


def test_decoded_images_are_clamped_to_0_1_and_truncated_from_times_255_like_edm2():
    vae = LinearVAE()
    out = torch.tensor([-0.2, 0.0, 0.5, 100.2 / 255, 1.0, 1.3]).view(1, 1, 1, 6).repeat(1, 3, 1, 1)
    raw = out * vae.scale + 1                                          # what decode maps back onto `out`
    images = networks.decode_latents(vae, networks.normalize_latents(torch.cat([raw, raw[:, :1]], dim=1)))
    assert images.dtype == torch.uint8
    assert images[0, 0, 0].tolist() == [0, 0, 127, 100, 255, 255]       # 127.5 -> 127, as EDM2 truncates


def test_vae_round_trip_of_an_exact_stand_in_returns_the_uint8_images():
    """Up to truncation: a level that comes back as 127.99998 is 127, as in EDM2."""
    vae = LinearVAE()
    images = torch.arange(256, dtype=torch.uint8).repeat(3).view(1, 3, 16, 16)
    images = torch.cat([images, images.flip(-1), images.transpose(-1, -2)])
    x = networks.normalize_latents(networks.encode_images(vae, images)[:, :4])
    error = images.int() - networks.decode_latents(vae, x).int()
    assert error.min() >= 0 and error.max() <= 1 and (error == 0).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------------
# Generation and distributed evaluation.

def test_generated_image_is_g_of_2_5_times_the_seeds_noise_in_bytes():
    """fid.py gen's images: G(2.5 z, 2.5, c), z ~ N(0, I) and then the class drawn from the seed's generator,
    and [-1, 1] mapped to 0..255 as EDM saves images."""
    G = small_generator(label_dim=10)
    seen, forward = [], G.forward
    G.forward = lambda x, sigma, labels=None, *args, **kwargs: seen.append((x, sigma, labels)) or forward(x, sigma, labels)
    images = fid.generate_images(G, torch.tensor([7, 3]))
    [(x, sigma, labels)] = seen
    for i, seed in enumerate([7, 3]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(x[i], 2.5 * torch.randn(3, 8, 8, generator=g))
        assert labels[i].tolist() == F.one_hot(torch.randint(10, [], generator=g), 10).float().tolist()
    assert float(sigma) == 2.5
    out = forward(x, sigma, labels).detach()
    assert torch.equal(images, (out * 127.5 + 128).clip(0, 255).to(torch.uint8))


def test_generated_image_and_class_depend_on_seed_only():
    G = small_generator(label_dim=10)
    calls = []
    forward = G.forward
    G.forward = lambda x, sigma, labels=None, *args, **kwargs: calls.append(labels) or forward(x, sigma, labels)
    together = fid.generate_images(G, torch.tensor([3, 4, 5]))
    alone = fid.generate_images(G, torch.tensor([5]))
    assert together.dtype == torch.uint8 and together.shape == (3, 3, 8, 8)
    torch.testing.assert_close(together[2], alone[0])
    torch.testing.assert_close(calls[0][2], calls[1][0])
    assert calls[0].sum(dim=1).tolist() == [1, 1, 1]                    # one-hot classes


class LatentG(torch.nn.Module):
    img_channels, img_resolution, label_dim, latent = 4, 8, 0, True

    def forward(self, x, sigma, labels=None):
        return x / sigma


def tiny_vae():
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                   down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                                   layers_per_block=1, norm_num_groups=4).eval()


def test_latent_generator_is_decoded_by_the_vae_to_uint8_images():
    images = fid.generate_images(LatentG(), torch.arange(3), device='cpu', vae=tiny_vae())
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)   # two VAE blocks: x2


def test_vae_encode_gives_mean_and_std_that_decode_back_to_images():
    vae = tiny_vae()
    mean_std = networks.encode_images(vae, torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert mean_std.shape == (2, 8, 8, 8) and (mean_std[:, 4:] > 0).all()
    x = networks.normalize_latents(mean_std[:, :4])
    assert torch.allclose(networks.denormalize_latents(x), mean_std[:, :4], atol=1e-5)
    assert networks.decode_latents(vae, x).shape == (2, 3, 16, 16)


def test_missing_diffusers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)
    with pytest.raises(networks.UserError, match='pip install diffusers'):
        networks.load_vae()


def test_parse_seeds_reads_ranges_and_lists():
    assert fid.parse_seeds('0-3,7') == [0, 1, 2, 3, 7]
    with pytest.raises(networks.UserError, match='--seeds'):
        fid.parse_seeds('a-b')


def toy_generate(seeds):
    """Images that depend on the seed only (for the distributed test)."""
    return torch.stack([torch.from_numpy(random_images(1, seed=int(s), size=16)[0]) for s in seeds])


def distributed_worker(rank, world_size, init_file, out_file, num=23, want_is=True):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    result = fid.generator_metrics(toy_generate, num, toy.load_classifier(), batch=4, want_is=want_is, progress=False)
    if rank == 1:
        torch.save(result, out_file)
    torch.distributed.destroy_process_group()


def test_generator_metrics_on_two_ranks_equal_one_process(tmp_path):
    single = fid.generator_metrics(toy_generate, 23, toy.load_classifier(), batch=5, want_is=True)
    torch.multiprocessing.spawn(distributed_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'out.pt')), nprocs=2)
    double = torch.load(tmp_path / 'out.pt', weights_only=False)
    np.testing.assert_allclose(double['mu'], single['mu'], rtol=1e-12)
    np.testing.assert_allclose(double['sigma'], single['sigma'], rtol=1e-9, atol=1e-12)
    assert double['is'] == pytest.approx(single['is'], rel=1e-9)        # same images in the same splits


def test_generator_metrics_with_fewer_images_than_ranks(tmp_path):
    """The third rank has no seed: it generates nothing and still joins the sums."""
    single = fid.generator_metrics(toy_generate, 2, toy.load_classifier(), batch=4)
    torch.multiprocessing.spawn(distributed_worker, args=(3, str(tmp_path / 'init'), str(tmp_path / 'out.pt'), 2, False),
                                nprocs=3)
    triple = torch.load(tmp_path / 'out.pt', weights_only=False)
    np.testing.assert_allclose(triple['mu'], single['mu'], rtol=1e-5, atol=1e-6)    # float32 features, batches of 2 vs 1

# ----------------------------------------------------------------------------------------------------
# The toy run's Inception: toy.Classifier, its fd and acc.

def toy_fd(classifier, images, ref):
    s = fid.FeatureStats()
    s.update(fid.run_detector(classifier, images, 'cpu', return_features=True))
    return fid.frechet_distance(*s.mean_cov(), *ref)


def test_toy_classifier_training_is_deterministic():
    a, b = make.train_classifier(steps=3, batch=16), make.train_classifier(steps=3, batch=16)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    images = toy.images(8, seed=0)[0]
    assert torch.equal(a(images, return_features=True), b(images, return_features=True))


def test_toy_classifier_shipped_is_accurate_on_held_out_images():
    classifier = toy.load_classifier()
    images, labels = toy.images(toy.TEST_IMAGES, seed=toy.TEST_SEED)
    assert toy.accuracy(classifier, images, labels) >= 0.99


def test_toy_classifier_has_the_inception_call_signature():
    classifier = toy.load_classifier()
    images = toy.images(5, seed=0)[0]
    features = classifier(images, return_features=True)
    probs = classifier(images, no_output_bias=True)
    assert features.shape == (5, classifier.dim) and probs.shape == (5, toy.CLASSES)
    assert torch.allclose(probs.sum(dim=1), torch.ones(5)) and torch.equal(probs, classifier(images))


def test_toy_classifier_file_that_is_not_one_is_refused(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='junk.pt'):
        toy.load_classifier(str(tmp_path / 'junk.pt'))
    with pytest.raises(UserError, match='toy/make.py classifier'):
        toy.load_classifier(str(tmp_path / 'missing.pt'))


def test_toy_fd_sees_noise_blur_colour_and_missing_classes():
    classifier = toy.load_classifier()
    s = fid.FeatureStats()
    s.update(fid.run_detector(classifier, toy.images(4000, seed=2)[0], 'cpu', return_features=True))
    ref = s.mean_cov()
    images, labels = toy.images(1000, seed=3)
    torch.manual_seed(0)
    blurred = F.avg_pool2d(F.pad(images.float(), (1, 1, 1, 1), mode='replicate'), 3, stride=1)
    changed = {'noisy': (images.double() + 15 * torch.randn(images.shape)).clamp(0, 255).to(torch.uint8),
               'blurred': blurred.round().to(torch.uint8),
               'tinted': (images.double() * torch.tensor([1.0, 0.8, 0.8])[:, None, None]).to(torch.uint8),
               'two classes': images[labels < 2].repeat(3, 1, 1, 1)[:1000]}
    same = toy_fd(classifier, images, ref)
    for name, x in changed.items():
        assert toy_fd(classifier, x, ref) > 3 * same, name


class LabelPainter(nn.Module):
    """A 'generator' whose image is its one-hot class label, painted over the whole image."""
    img_channels, img_resolution, label_dim, latent = 3, 4, 4, False

    def forward(self, x, sigma, labels):
        return labels.argmax(dim=1).float().view(-1, 1, 1, 1).expand_as(x) / 127.5 - 1 + 0 * x


def test_generated_classes_are_the_classes_generate_images_asks_for():
    seeds = torch.arange(20)
    images = fid.generate_images(LabelPainter(), seeds, device='cpu')
    classes = fid.generated_classes(seeds, 4, (3, 4, 4))
    assert torch.equal(images[:, 0, 0, 0].long(), classes) and len(set(classes.tolist())) == 4


def test_toy_run_logs_fd_and_acc_of_data_teacher_and_generator(tiny_teacher, tmp_path):
    r = run_sida(tmp_path, tiny_teacher, '--duration', '0.000016', '--metrics', 'fd1k')
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    # The summary reports the final EMA generator (the last snapshot: 16 images), beside the baselines.
    lines = r.stdout.splitlines()
    table = lines[[i for i, line in enumerate(lines) if line.startswith('result')][-1]:]
    cell = lambda v: f'{v:,.0f}' if v >= 100 else f'{v:.4g}'
    assert table[0].split() == ['result', 'fd1k', 'acc1k']
    assert table[1].split() == ['real', 'data', cell(rows[0]['fd1k_data']), cell(rows[0]['acc1k_data'])]
    final = [line for line in table if 'final EMA' in line][0].split()
    assert final[-2:] == [cell(rows[-1]['fd1k']), cell(rows[-1]['acc1k'])]
    assert 'generator-000000.016.pt' in table[-1] and os.path.isfile(tmp_path / 'generator-000000.016.pt')
    for key in ('fd1k_data', 'fd1k_teacher35', 'acc1k_data', 'acc1k_teacher35', 'fd1k', 'acc1k'):
        assert key in rows[0], key
    assert 'fd1k_teacher17' not in rows[0]            # the best sampler is known for the shipped teachers only
    assert 'fd1k' in rows[-1] and 'acc1k' in rows[-1]
    assert rows[0]['acc1k_data'] >= 0.99 and rows[0]['fd1k_data'] < rows[0]['fd1k_teacher35']
    assert 0 <= rows[-1]['acc1k'] <= 1


def test_a_missing_shipped_toy_file_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setattr(toy, 'HERE', str(tmp_path))                     # a copy of the project without toy/ddpmpp
    args = sida.parse_args(['--preset', 'toy', '--outdir', str(tmp_path / 'run')])
    with pytest.raises(UserError, match=re.escape(f'{tmp_path}/ddpmpp/teacher.pt is missing: make it with '
                                                  f'python toy/make.py teacher --arch ddpmpp')):
        sida.check_inputs(args, str(tmp_path / 'run'))


def test_toy_preset_distils_the_shipped_files_of_its_architecture():
    for arch in ('ddpmpp', 'edm2'):
        args = sida.parse_args(['--preset', 'toy', '--arch', arch])
        assert args.teacher == os.path.join(HERE, 'toy', arch, 'teacher.pt') and os.path.isfile(args.teacher)
        teacher = networks.load_network(args.teacher)
        assert teacher.meta['kimg'] == make.TEACHER_KIMG[arch] and teacher.meta['method'] == 'edm-teacher'
        assert teacher.label_dim == 4 and teacher.magnitude_preserving == (arch == 'edm2')
    # DDPM++: SiD²A from the shipped SiD generator; EDM2 (no SiD generator shipped): SiDA from the teacher.
    args = sida.parse_args(['--preset', 'toy'])
    assert args.method == 'sid2a' and args.init_generator == os.path.join(HERE, 'toy', 'ddpmpp', 'sid-generator.pt')
    assert sida.parse_args(['--preset', 'toy', '--method', 'sida']).init_generator is None
    edm2 = sida.parse_args(['--preset', 'toy', '--arch', 'edm2'])
    assert edm2.method == 'sida' and edm2.duration > args.duration     # SiDA from the teacher takes longer


def test_toy_sid_generator_is_the_documented_commands_output(tmp_path):
    """toy/ddpmpp/sid-generator.pt is what `python toy/make.py sid-generator` writes: the final EMA generator
    of a SiD run of the shipped teacher, with the run's flags; here the same command for 1 kimg."""
    shipped = networks.load_network(toy.shipped('sid-generator'))
    teacher = networks.load_network(toy.shipped('teacher'))
    assert shipped.config == teacher.config and shipped.meta['method'] == 'sid'
    assert shipped.meta['flags'] == ' '.join(['--preset', 'toy', '--arch', 'ddpmpp', *make.SID_FLAGS,
                                              '--duration', str(make.SID_DURATION)])
    assert shipped.meta['kimg'] >= 1000 * make.SID_DURATION
    dest = tmp_path / 'sid-generator.pt'
    cmd = [sys.executable, os.path.join(HERE, 'toy', 'make.py'), 'sid-generator', '--dest', str(dest),
           '--outdir', str(tmp_path / 'run'), '--duration', '0.001', '--', '--metrics', 'none', '--device', 'cpu']
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
    assert r.returncode == 0, r.stderr
    made = networks.load_network(str(dest))
    assert made.config == shipped.config and set(made.meta) == set(shipped.meta) and made.meta['kimg'] == 1.024
    assert {k: v.dtype for k, v in made.state_dict().items()} == {k: v.dtype for k, v in shipped.state_dict().items()}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f'error: --dest {dest} exists; not overwriting it (move it away to remake it)'


def test_toy_teacher_command_trains_saves_and_does_not_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy, 'Metrics', functools.partial(toy.Metrics, num=256))   # its measurement, on fewer samples
    dest = tmp_path / 'teacher.pt'
    argv = ['teacher', '--kimg', '0.256', '--dest', str(dest)]
    make.main(argv)
    teacher = networks.load_network(str(dest))
    assert teacher.meta['kimg'] == 0.256 and teacher.label_dim == 4 and teacher.config == toy_config('ddpmpp')
    out = capsys.readouterr().out
    assert {'fd_data', 'acc_data', 'fd_teacher35', 'acc_teacher35'} <= set(json.loads(out.splitlines()[-1]))
    before = dest.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        make.main(argv)
    assert exit_.value.code == 1 and 'not overwriting' in capsys.readouterr().err and dest.read_bytes() == before
    other, train = tmp_path / 'other.pt', make.train_teacher     # a --dest made by another program while it trained
    monkeypatch.setattr(make, 'train_teacher', lambda *a, **k: other.write_bytes(b'theirs') and train(*a, **k))
    with pytest.raises(SystemExit) as exit_:
        make.main(['teacher', '--kimg', '0.256', '--dest', str(other)])
    assert exit_.value.code == 1 and other.read_bytes() == b'theirs'
    assert capsys.readouterr().err.endswith(f'not overwriting it: the result is {tmp_path / "other-1.pt"}\n')
    assert networks.load_network(str(tmp_path / 'other-1.pt')).meta['kimg'] == 0.256


def toy_config(arch):
    return networks.build_network(toy.arch(arch)).config


def test_toy_sweep_summary_reads_each_run_against_its_teacher(tmp_path):
    rows = [{'tick': 0, 'kimg': 0.0, 'fd_teacher35': 100.0, 'acc_teacher35': 0.9, 'fd': 1000.0, 'acc': 0.5},
            {'kimg': 2.0, 'fd': 90.0, 'acc': 0.8}, {'kimg': 4.0, 'fd': 120.0, 'acc': 0.95},
            {'kimg': 6.0, 'fd': 95.0, 'acc': 0.91, 'sec_per_kimg': 3.0}]
    line = sweep.summarise('x', rows, [4, 50])
    assert '@4:     120 0.950' in line and '@50: -' in line and 'best fd 90 @2' in line and 'both @6' in line
    assert 'both -' in sweep.summarise('x', rows[:3], [4]) and 'no snapshot' in sweep.summarise('x', [], [4])
    r = subprocess.run([sys.executable, os.path.join(HERE, 'toy', 'sweep.py'), 'no-such-runs.txt', 'out'],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == 'sweep.py: no-such-runs.txt: no such file'
    runs = tmp_path / 'runs.txt'
    runs.write_text('a\n\n# a comment\na --seed 1\n')
    r = subprocess.run([sys.executable, os.path.join(HERE, 'toy', 'sweep.py'), str(runs), str(tmp_path / 'out')],
                       capture_output=True, text=True)
    assert r.returncode == 1 and 'run names must differ' in r.stderr and not (tmp_path / 'out').exists()

def test_toy_curves_tabulate_mean_and_std_over_seeds(tmp_path):
    def run(name, fds, accs, kimgs=(0.0, 12.288, 24.576, 49.152, 60.0)):
        (tmp_path / name).mkdir()
        rows = [{'tick': 0, 'kimg': 0.0, 'fd_data': 50.0, 'acc_data': 0.99, 'fd_teacher35': 800.0, 'acc_teacher35': 0.97}]
        rows += [{'tick': i + 1, 'kimg': k, 'time_s': 10.0 * k, 'fd': f, 'acc': a} for i, (k, f, a) in enumerate(zip(kimgs[1:], fds, accs))]
        (tmp_path / name / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
        return str(tmp_path / name)
    a = run('a', [3000., 2000., 1000., 10.], [0.90, 0.92, 0.94, 0.99])
    b = run('b', [5000., 4000., 1400., 20.], [0.80, 0.94, 0.96, 0.99])
    r = subprocess.run([sys.executable, os.path.join(HERE, 'toy', 'curves.py'), str(tmp_path / 'c.png'), 'row',
                        f'X={a},{b}', '--kimg', '12,25,49', '--until', '50', '--at-time', '250', '--window', '20,50'],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[0] == ('| | fd at 12 / 25 / 49 kimg / end | acc at 12 / 25 / 49 kimg / end | fd, acc after 250 s (kimg) '
                        '| fd, acc over the snapshots of 20–50 kimg |')
    assert lines[2] == ('| X (2 seeds) | 4,000 ± 1,000 / 3,000 ± 1,000 / 1,200 ± 200 / 1,200 ± 200 '   # the 60-kimg rows are left out
                        '| 0.850 ± 0.050 / 0.930 ± 0.010 / 0.950 ± 0.010 / 0.950 ± 0.010 | 3,000 ± 1,000, 0.930 ± 0.010 (25) '
                        '| 2,100 ± 600, 0.940 ± 0.010 |')              # seeds: (2000 + 1000) / 2, (4000 + 1400) / 2
    assert lines[3:] == ['| real data | 50.0 | 0.990 | | |', '| teacher, 35 NFE | 800.0 | 0.970 | | |']
    with PIL.Image.open(tmp_path / 'c.png') as plot:
        assert plot.size == (1040, 390)
    r = subprocess.run([sys.executable, os.path.join(HERE, 'toy', 'curves.py'), str(tmp_path / 'd.png'), f'X={a},nowhere'],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == 'curves.py: X: nowhere: no log.jsonl' and not (tmp_path / 'd.png').exists()


def test_toy_curves_band_is_the_population_std():
    runs = [[{'tick': 0, 'kimg': 0.0}, {'tick': 1, 'kimg': 12.0, 'fd': fd}] for fd in (1000.0, 3000.0)]
    kimg, mean, std = curves.over_seeds(runs, 'fd')
    assert kimg.tolist() == [12.0] and mean.tolist() == [2000.0] and std.tolist() == [1000.0]


def test_toy_fd_reference_is_its_own_real_images_not_the_held_out_ones(monkeypatch):
    """fd compares with REF_IMAGES real images of their own seed; the held-out images (the `real data`
    baseline) must not be among them, or that baseline would measure the reference against itself."""
    calls, images = [], toy.images
    monkeypatch.setattr(toy, 'images', lambda n, seed: calls.append((n, seed)) or images(64, seed))
    toy.Metrics('cpu', num=64)
    assert calls == [(10000, 2)]
    assert len({toy.TRAIN_SEED, toy.REF_SEED, toy.HELD_OUT_SEED, toy.TEST_SEED}) == 4


def test_toy_fd_needs_toy_data(tiny_teacher, tmp_path):
    data = write_dataset(tmp_path / 'd', 4, 16, labels=[0, 1])
    r = run_sida(tmp_path / 'out', tiny_teacher, '--data', data, '--metrics', 'fd', check=False)
    assert r.returncode == 1 and '--data toy' in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ===================================================================================================
# The launch scripts (train_*.sh, launch.sh): published settings, downloads, data checks
# ===================================================================================================

CIFAR = ROOT / 'train_cifar.sh'
IMAGENET = ROOT / 'train_imagenet.sh'
FACES = ROOT / 'train_ffhq_afhq.sh'
SCRIPTS = [CIFAR, IMAGENET, FACES]
LAUNCH = ROOT / 'launch.sh'   # sourced by the three scripts: the mechanics they share
METHODS = ['sid', 'sida', 'sid2a']
SIZES = ['xs', 's', 'm', 'l', 'xl', 'xxl']
RESOLUTIONS = ['64'] + [f'512-{size}' for size in SIZES]
BOOLEAN_FLAGS = {'--cond', '--compile', '--logvar', '--no-logvar', '--force-norm', '--no-force-norm', '--is'}

# The official runs' settings, the SiDA row of each run; SiD and SiD²A differ as the scripts' headers say.
CIFAR_SIDA = dict(batch=256, lr=1e-5, glr=1e-5, alpha=1.0, precision='fp32', dropout=0.13,
                  augment=0.12, ema=0.5, lsg=100, lsd=1, lsg_gan=0.01, duration=300,
                  tmax=800, init_sigma=2.5, p_mean=-1.2, p_std=1.2)
IMAGENET64_SIDA = dict(batch=8192, lr=4e-6, glr=4e-6, alpha=1.0, precision='fp16', dropout=0.1,
                       augment=0, ema=2, lsg=100, lsd=1, lsg_gan=0.01, duration=300,
                       tmax=800, init_sigma=2.5, p_mean=-1.2, p_std=1.2)
IMG512_SIDA = dict(batch=2048, lr=5e-5, glr=5e-5, alpha=1.0, precision='fp16', dropout=0.1,
                   augment=0, ema=2, lsg=100, lsd=100, lsg_gan=0.01, duration=200,
                   tmax=800, init_sigma=2.5, p_mean=-0.4, p_std=1.0)
# Upstream's EDM2 run scripts, per size: SiDA and SiD²A durations (Mimg); S runs without log-variance
# weighting and forced weight normalisation, every other size with both.
EDM2_SIDA_DURATION = {'xs': 200, 's': 200, 'm': 200, 'l': 200, 'xl': 200, 'xxl': 100}
EDM2_SID2A_DURATION = {'xs': 30, 's': 80, 'm': 200, 'l': 55, 'xl': 50, 'xxl': 30}
FACES_SIDA = {'ffhq': dict(batch=512, lr=1e-5, glr=1e-5, alpha=1.0, precision='fp16', dropout=0.05, augment=0.15,
                           ema=0.5, lsg=100, lsd=1, lsg_gan=0.01, duration=200, tmax=800, init_sigma=2.5,
                           p_mean=-1.2, p_std=1.2)}
FACES_SIDA['afhq'] = dict(FACES_SIDA['ffhq'], lr=5e-6, glr=5e-6)
EDM2_TEACHERS = {'xs': 'edm2-img512-xs-2147483-0.135.pkl', 's': 'edm2-img512-s-2147483-0.130.pkl',
                 'm': 'edm2-img512-m-2147483-0.100.pkl', 'l': 'edm2-img512-l-1879048-0.085.pkl',
                 'xl': 'edm2-img512-xl-1342177-0.085.pkl', 'xxl': 'edm2-img512-xxl-0939524-0.070.pkl'}
SID_GENERATORS = {
    'cifar10-uncond': 'https://huggingface.co/UT-Austin-PML/SiD/resolve/main/cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl',
    'cifar10-cond': 'https://huggingface.co/UT-Austin-PML/SiD/resolve/main/cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl',
    '64': 'https://huggingface.co/UT-Austin-PML/SiD/resolve/main/imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl',
    **{f'512-{size}': 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/'
       + f'edm2_img512_{size}_{"sida" if size == "xxl" else "sid"}_alpha1-{n}.pkl'
       for size, n in [('xs', '249360'), ('s', '192010'), ('m', '226830'), ('l', '203788'),
                       ('xl', '234004'), ('xxl', '077932')]},
}
INCEPTION = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'


def expected_settings(sida_row, method, sid_alpha, sid_duration):
    settings = dict(sida_row, method=method)
    if method == 'sid':
        settings.update(alpha=sid_alpha, duration=sid_duration, lsd=None, lsg_gan=None)
    if method == 'sid2a':
        settings.update(duration=100)
    return settings


# ---- helpers -----------------------------------------------------------------------------------

def make_dataset(path, ext='png', labels=True, with_json=True):
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr(f'00000/img00000000.{ext}', b'x')
        if with_json:
            z.writestr('dataset.json', json.dumps({'labels': [['00000/img00000000.' + ext, 3]] if labels else None}))
    return path


def make_tool(bindir, name, body):
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text('#!/usr/bin/env bash\n' + body + '\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return tool


@pytest.fixture
def env(tmp_path):
    """A hermetic environment: fresh HOME and cache, eight GPUs, no multi-node variables."""
    keep = {'PATH', 'LANG', 'LC_ALL', 'TMPDIR'}
    e = {k: v for k, v in os.environ.items() if k in keep}
    (tmp_path / 'home').mkdir()
    e.update(HOME=str(tmp_path / 'home'), SIDA_CACHE=str(tmp_path / 'cache'), NGPU='8')
    return e


@pytest.fixture
def data64(tmp_path):
    return make_dataset(tmp_path / 'imagenet-64x64.zip', 'png')


@pytest.fixture
def data512(tmp_path):
    return make_dataset(tmp_path / 'img512-sd.zip', 'npy')


def run(script, *args, env, cwd=None, **more_env):
    return subprocess.run(['bash', str(script), *map(str, args)], env={**env, **more_env},
                          cwd=cwd or env['HOME'], capture_output=True, text=True, timeout=60)


def torchrun_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith('torchrun ')]
    assert len(lines) == 1, stdout
    return lines[0]


def split_command(stdout, program='sida.py'):
    """-> (torchrun's own arguments, the program's flags as a dict, its argument list); fid.py: after `gen`."""
    tokens = shlex.split(torchrun_line(stdout))
    i = next(i for i, t in enumerate(tokens) if t.endswith(program))
    launcher, sida_args = tokens[:i], tokens[i + 1:]
    if program == 'fid.py':
        assert sida_args[0] == 'gen', sida_args
        sida_args = sida_args[1:]
    flags, j = {}, 0
    while j < len(sida_args):
        flag = sida_args[j]
        assert flag.startswith('--'), sida_args
        if flag in BOOLEAN_FLAGS:
            flags[flag] = True
            j += 1
        else:
            flags[flag] = sida_args[j + 1]
            j += 2
    return launcher, flags, sida_args


def assert_settings(flags, settings):
    for key, want in settings.items():
        flag = '--' + key.replace('_', '-')
        if want is None:
            assert flag not in flags, f'{flag} should be absent'
        elif isinstance(want, str):
            assert flags.get(flag) == want, f'{flag}: {flags.get(flag)} != {want}'
        else:
            assert flag in flags, f'{flag} missing'
            assert float(flags[flag]) == pytest.approx(want, rel=1e-12), f'{flag}: {flags[flag]} != {want}'


# ---- the published settings --------------------------------------------------------------------

@pytest.mark.parametrize('cond', ['uncond', 'cond'])
@pytest.mark.parametrize('method', METHODS)
def test_cifar_dry_run_carries_published_settings(env, method, cond):
    r = run(CIFAR, method, cond, '--dry-run', env=env)
    assert r.returncode == 0, r.stderr
    launcher, flags, _ = split_command(r.stdout)
    assert_settings(flags, expected_settings(CIFAR_SIDA, method, sid_alpha=1.2, sid_duration=500))
    cache = Path(env['SIDA_CACHE'])
    assert flags['--teacher'] == str(cache / f'edm-cifar10-32x32-{cond}-vp.pkl')
    assert flags['--data'] == str(cache / 'cifar-10-python.tar.gz')
    assert flags['--ref'] == str(cache / 'cifar10-32x32.npz')
    assert flags['--detector'] == str(cache / 'inception-2015-12-05.pt')
    assert flags['--metrics'] == 'fid50k'
    assert ('--cond' in flags) == (cond == 'cond')
    assert ('--init-generator' in flags) == (method == 'sid2a')
    assert flags['--outdir'] == f'runs/cifar10-{cond}-{method}'
    assert flags['--batch-gpu'] == '32'                # upstream's per-GPU batch (on 8 GPUs, the whole share)
    assert '--nproc_per_node=8' in launcher


@pytest.mark.parametrize('res', RESOLUTIONS)
@pytest.mark.parametrize('method', METHODS)
def test_imagenet_dry_run_carries_published_settings(env, data64, data512, method, res):
    data = data64 if res == '64' else data512
    r = run(IMAGENET, method, res, '--dry-run', env=env, DATA=str(data))
    assert r.returncode == 0, r.stderr
    assert 'warning' not in r.stderr
    launcher, flags, _ = split_command(r.stdout)
    cache = Path(env['SIDA_CACHE'])
    if res == '64':
        want = expected_settings(IMAGENET64_SIDA, method, sid_alpha=1.2, sid_duration=300)
        teacher, ref = 'edm-imagenet-64x64-cond-adm.pkl', 'imagenet-64x64.npz'
    else:
        size = res.split('-')[1]
        want = expected_settings(IMG512_SIDA, method, sid_alpha=1.0, sid_duration=200)
        want['dropout'] = 0 if size in ('xs', 's') else 0.1
        want['duration'] = (EDM2_SID2A_DURATION if method == 'sid2a' else EDM2_SIDA_DURATION)[size]
        teacher, ref = EDM2_TEACHERS[size], 'img512.pkl'
    assert_settings(flags, want)
    assert flags['--teacher'] == str(cache / teacher)
    assert flags['--ref'] == str(cache / ref)
    assert flags['--detector'] == str(cache / 'inception-2015-12-05.pt')
    assert flags['--data'] == str(data)
    assert flags['--cond'] is True
    assert flags['--metrics'] == 'fid50k'
    assert ('--init-generator' in flags) == (method == 'sid2a')
    assert '--nproc_per_node=8' in launcher


@pytest.mark.parametrize('script, setting', [(CIFAR, 'uncond'), (CIFAR, 'cond')]
                         + [(IMAGENET, res) for res in RESOLUTIONS])
def test_sid2a_starts_from_the_released_sid_generator(env, data512, script, setting):
    r = run(script, 'sid2a', setting, '--dry-run', env=env, DATA=str(data512))
    assert r.returncode == 0, r.stderr
    key = f'cifar10-{setting}' if script == CIFAR else setting
    url = SID_GENERATORS[key]
    downloads = [line for line in r.stdout.splitlines() if line.startswith(('curl ', 'wget '))]
    download = next(line for line in downloads if line.endswith(url))
    _, flags, _ = split_command(r.stdout)
    tmp = shlex.split(download)[-2]
    assert f'mv {tmp} {flags["--init-generator"]}' in r.stdout


# ---- downloads ---------------------------------------------------------------------------------

def test_dry_run_prints_every_download_and_touches_nothing(env, tmp_path):
    r = run(CIFAR, 'sida', 'uncond', '--dry-run', env=env)
    assert r.returncode == 0, r.stderr
    for url in ['https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl',
                'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz', INCEPTION]:
        assert any(line.startswith(('curl ', 'wget ')) and line.endswith(url)
                   for line in r.stdout.splitlines()), url
    assert f'mkdir -p {env["SIDA_CACHE"]}' in r.stdout
    assert not Path(env['SIDA_CACHE']).exists()
    assert list(Path(env['HOME']).iterdir()) == []


def test_imagenet_dry_run_downloads_the_edm2_teacher_and_reference(env, data512):
    r = run(IMAGENET, 'sida', '512-m', '--dry-run', env=env, DATA=str(data512))
    assert r.returncode == 0, r.stderr
    assert 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-m-2147483-0.100.pkl' in r.stdout
    assert 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl' in r.stdout
    assert INCEPTION in r.stdout
    assert not Path(env['SIDA_CACHE']).exists()


def test_dry_run_lines_are_valid_shell(env):
    r = run(CIFAR, 'sid2a', 'cond', '--dry-run', '--note', "it's a test", env=env)
    for line in r.stdout.splitlines():
        assert subprocess.run(['bash', '-n', '-c', line]).returncode == 0, line
    *_, sida_args = split_command(r.stdout)
    assert sida_args[-2:] == ['--note', "it's a test"]


def cifar_cache(env, setting='uncond', content=b'cached'):
    """SIDA_CACHE holding what train_cifar.sh downloads for SETTING (files of `content`): no download runs."""
    cache = Path(env['SIDA_CACHE'])
    cache.mkdir()
    for name in [f'edm-cifar10-32x32-{setting}-vp.pkl', 'cifar-10-python.tar.gz', 'cifar10-32x32.npz',
                 'inception-2015-12-05.pt']:
        (cache / name).write_bytes(content)
    return cache


def test_cached_files_are_not_downloaded_again(env):
    cifar_cache(env)
    r = run(CIFAR, 'sida', 'uncond', '--dry-run', env=env)
    assert r.returncode == 0, r.stderr
    assert not any(line.startswith(('curl ', 'wget ', 'mkdir ', 'mv ')) for line in r.stdout.splitlines())
    assert r.stdout.count('# cached: ') == 4


@pytest.fixture
def fake_torchrun(tmp_path):
    """A torchrun on PATH that records its arguments, one per line, instead of training."""
    record = tmp_path / 'torchrun-args'
    bindir = tmp_path / 'bin'
    make_tool(bindir, 'torchrun', f'printf "%s\\n" "$@" > {shlex.quote(str(record))}')
    return bindir, record


def test_real_run_downloads_atomically_then_launches_torchrun(env, tmp_path, fake_torchrun):
    bindir, record = fake_torchrun
    cache = cifar_cache(env, 'cond')
    source = tmp_path / 'my-sid.pkl'
    source.write_bytes(b'generator weights')
    env = dict(env, PATH=f'{bindir}:{env["PATH"]}', INIT_GENERATOR=source.as_uri())
    r = run(CIFAR, 'sid2a', 'cond', '--seed', '5', env=env)
    assert r.returncode == 0, r.stderr
    assert (cache / 'sid-cifar10-cond-my-sid.pkl').read_bytes() == b'generator weights'
    assert not list(cache.glob('*.part*'))
    launched = record.read_text().splitlines()
    printed = shlex.split(torchrun_line(r.stdout))
    assert launched == printed[1:]
    assert launched[launched.index('--init-generator') + 1] == str(cache / 'sid-cifar10-cond-my-sid.pkl')
    assert launched[-2:] == ['--seed', '5']


def test_failed_download_leaves_no_partial_file_and_exits_1(env, tmp_path, fake_torchrun):
    bindir, record = fake_torchrun
    env = dict(env, PATH=f'{bindir}:{env["PATH"]}', INIT_GENERATOR=(tmp_path / 'absent.pkl').as_uri())
    cache = cifar_cache(env)
    r = run(CIFAR, 'sid2a', 'uncond', env=env)
    assert r.returncode == 1
    assert 'could not download' in r.stderr and 'absent.pkl' in r.stderr
    assert sorted(p.name for p in cache.iterdir()) == ['cifar-10-python.tar.gz', 'cifar10-32x32.npz',
                                                       'edm-cifar10-32x32-uncond-vp.pkl',
                                                       'inception-2015-12-05.pt']
    assert not record.exists()


def test_wget_is_used_when_curl_is_missing(env, tmp_path):
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    for tool in ['bash', 'dirname', 'python3']:
        (bindir / tool).symlink_to(shutil.which(tool))
    make_tool(bindir, 'wget', 'exit 0')
    r = run(CIFAR, 'sida', 'uncond', '--dry-run', env=env, PATH=str(bindir))
    assert r.returncode == 0, r.stderr
    downloads = [line for line in r.stdout.splitlines() if line.startswith(('curl ', 'wget '))]
    assert len(downloads) == 4 and all(line.startswith('wget -O ') for line in downloads)


def test_local_init_generator_is_used_without_download(env, tmp_path):
    r = run(CIFAR, 'sid2a', 'uncond', '--dry-run', env=env, INIT_GENERATOR=str(tmp_path / 'g.pkl'))
    _, flags, _ = split_command(r.stdout)
    assert flags['--init-generator'] == str(tmp_path / 'g.pkl')
    assert 'huggingface' not in r.stdout


# ---- ImageNet dataset check --------------------------------------------------------------------

@pytest.mark.parametrize('res, words', [
    ('64', ['dataset_tool.py', '--resolution=64x64', 'dataset.json', 'labels', 'github.com/NVlabs/edm']),
    ('512-xs', ['dataset_tool.py convert', 'dataset_tool.py encode', '--resolution=512x512',
                'networks.py encode-latents', "this project's", 'dataset.json', '.npy', 'github.com/NVlabs/edm2']),
])
@pytest.mark.parametrize('method', METHODS)
def test_missing_imagenet_data_prints_instructions_and_exits_1(env, tmp_path, fake_torchrun, method, res, words):
    bindir, record = fake_torchrun
    env = dict(env, PATH=f'{bindir}:{env["PATH"]}', DATA=str(tmp_path / 'absent.zip'))
    r = run(IMAGENET, method, res, env=env)
    assert r.returncode == 1
    assert 'absent.zip' in r.stderr and 'no such file' in r.stderr
    for word in words + ['cannot be downloaded', 'DATA=', 'SiD uses only the labels']:
        assert word in r.stderr, word
    assert r.stdout == ''
    assert not record.exists()
    assert not Path(env['SIDA_CACHE']).exists()


@pytest.mark.parametrize('make, reason', [
    (lambda p: p.write_text('not a zip'), 'not a zip file'),
    (lambda p: make_dataset(p, 'png', with_json=False), 'no dataset.json'),
    (lambda p: make_dataset(p, 'png', labels=False), 'no class labels'),
    (lambda p: make_dataset(p, 'npy'), 'no .png files'),
    (lambda p: p.mkdir(), 'a folder: pass the zip made by dataset_tool.py'),
])
def test_malformed_imagenet_data_is_refused(env, tmp_path, make, reason):
    data = tmp_path / 'bad.zip'
    make(data)
    r = run(IMAGENET, 'sida', '64', env=env, DATA=str(data))
    assert r.returncode == 1
    assert reason in r.stderr and 'dataset_tool.py' in r.stderr


def test_latent_zip_is_required_at_512(env, data64):
    r = run(IMAGENET, 'sida', '512-l', env=env, DATA=str(data64))
    assert r.returncode == 1
    assert 'no .npy files' in r.stderr


def test_dry_run_with_missing_imagenet_data_warns_and_still_prints(env, tmp_path):
    r = run(IMAGENET, 'sid', '64', '--dry-run', env=env, DATA=str(tmp_path / 'absent.zip'))
    assert r.returncode == 0
    assert 'warning' in r.stderr and 'absent.zip' in r.stderr
    _, flags, _ = split_command(r.stdout)
    assert flags['--data'] == str(tmp_path / 'absent.zip')


def test_imagenet_data_defaults_to_the_edm_file_names(env):
    for res, name in [('64', 'datasets/imagenet-64x64.zip'), ('512-s', 'datasets/img512-sd.zip')]:
        r = run(IMAGENET, 'sida', res, '--dry-run', env=env)
        _, flags, _ = split_command(r.stdout)
        assert flags['--data'] == name


# ---- arguments and environment -----------------------------------------------------------------

@pytest.mark.parametrize('script, args', [
    (CIFAR, []), (CIFAR, ['sida']), (CIFAR, ['sidb', 'uncond']), (CIFAR, ['sida', 'conditional']),
    (CIFAR, ['--dry-run']), (IMAGENET, []), (IMAGENET, ['sida']), (IMAGENET, ['sida', '128']),
    (IMAGENET, ['sida', '512-xxxl']), (IMAGENET, ['gan', '64']), (IMAGENET, ['sida', '512']),
    (CIFAR, ['eval', 'sida']), (IMAGENET, ['eval', '64']), (FACES, []), (FACES, ['sida', 'celeba']),
    (FACES, ['eval', 'sida']),
])
def test_wrong_arguments_print_usage_and_exit_2(env, script, args):
    r = run(script, *args, env=env)
    assert r.returncode == 2
    assert 'usage:' in r.stderr
    assert r.stdout == ''


# The word after METHOD and its choices, per script.
SETTING_WORDS = {CIFAR: ('COND', ['uncond', 'cond']), IMAGENET: ('RES', RESOLUTIONS), FACES: ('DATA', ['ffhq', 'afhq'])}


@pytest.mark.parametrize('flag', ['--help', '-h'])
@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_the_usage_to_stdout_and_exits_0(env, script, flag):
    r = run(script, 'sida', flag, env=env)
    assert r.returncode == 0 and r.stderr == ''
    word, choices = SETTING_WORDS[script]
    assert r.stdout.startswith(f'usage: {script.name} [eval] METHOD {word} [--dry-run] ')
    assert f'  {word:<8}{" | ".join(choices)}' in r.stdout
    assert '--trials 10' in r.stdout                      # the official protocol: 10 trials of 50k images
    # Every environment variable the script (or launch.sh) reads, as ${NAME:-default}, is listed.
    source = script.read_text() + (script.parent / 'launch.sh').read_text()
    read = set(re.findall(r'\$\{([A-Z][A-Z_]*):-', source)) - {'BASH_VERSION'}
    names = re.findall(r'^  ([A-Z][A-Z_]*(?:, [A-Z][A-Z_]*)*)', r.stdout.split('Environment')[1], re.M)   # NNODES, NODE_RANK, ...
    listed = {name for line in names for name in line.split(', ')}
    assert read == listed, (read, listed)
    assert not Path(env['SIDA_CACHE']).exists()


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_wrong_or_missing_word_is_named_before_the_usage(env, script):
    word, choices = SETTING_WORDS[script]
    for args, error in [(['sidd', choices[0]], "error: METHOD 'sidd' is not one of: sid sida sid2a"),
                        (['eval', 'sida', 'bogus'], f"error: {word} 'bogus' is not one of: {' '.join(choices)}"),
                        (['sida'], f'error: expected METHOD and {word}'),
                        ([], f'error: expected METHOD and {word}')]:
        r = run(script, *args, '--dry-run', env=env)
        assert r.returncode == 2 and r.stdout == '', args
        first, second = r.stderr.splitlines()[:2]
        assert first == error and second.startswith(f'usage: {script.name} '), r.stderr


@pytest.mark.parametrize('script', [CIFAR, IMAGENET])
def test_bad_gpu_count_is_a_usage_error(env, script):
    r = run(script, 'sida', 'cond' if script == CIFAR else '64', '--dry-run', env=env, NGPU='eight')
    assert r.returncode == 2 and 'NGPU' in r.stderr


@pytest.mark.parametrize('script, setting', [(CIFAR, 'uncond'), (IMAGENET, '512-xl')])
def test_extra_arguments_pass_through_verbatim(env, data512, script, setting):
    extra = ['--seed', '7', '--tick', '10', '--outdir', 'my run']
    r = run(script, 'sida', setting, *extra, '--dry-run', env=env, DATA=str(data512))
    assert r.returncode == 0, r.stderr
    *_, sida_args = split_command(r.stdout)
    assert sida_args[-len(extra):] == extra


@pytest.mark.parametrize('script, setting, official', [(CIFAR, 'cond', 32), (IMAGENET, '64', 32), (IMAGENET, '512-xs', 64),
                                                       (IMAGENET, '512-xl', 16), (IMAGENET, '512-xxl', 2)])
def test_batch_gpu_is_upstreams_unless_set(env, data64, data512, script, setting, official):
    """Upstream's per-GPU batch: it fits a GPU, and SiDA's adversarial loss averages over it."""
    data = data512 if setting.startswith('512') else data64
    flags = lambda *a, **k: split_command(run(script, 'sida', setting, '--dry-run', *a, env=dict(env, **k),
                                              DATA=str(data)).stdout)[1]
    assert flags()['--batch-gpu'] == str(official)
    assert flags(BATCH_GPU='1')['--batch-gpu'] == '1'
    assert flags(NGPU='16')['--batch-gpu'] == str(min(official, int(flags()['--batch']) // 16))
    assert flags('--batch', '48', NGPU='1')['--batch-gpu'] == str(max(d for d in range(1, official + 1) if 48 % d == 0))


@pytest.mark.parametrize('script, setting', [(CIFAR, 'uncond'), (IMAGENET, '512-xxl')])
def test_multi_node_variables_reach_torchrun(env, data512, script, setting):
    r = run(script, 'sida', setting, '--dry-run', env=env, DATA=str(data512), NGPU='4', NNODES='2',
            NODE_RANK='1', MASTER_ADDR='10.1.2.3', MASTER_PORT='12345')
    assert r.returncode == 0, r.stderr
    launcher, _, _ = split_command(r.stdout)
    assert launcher == ['torchrun', '--nnodes=2', '--node_rank=1', '--nproc_per_node=4',
                        '--master_addr=10.1.2.3', '--master_port=12345']


def test_single_node_is_standalone(env):
    launcher, _, _ = split_command(run(CIFAR, 'sid', 'uncond', '--dry-run', env=env).stdout)
    assert launcher == ['torchrun', '--standalone', '--nproc_per_node=8']


def test_multi_node_without_master_addr_is_a_usage_error(env):
    r = run(CIFAR, 'sida', 'uncond', '--dry-run', env=env, NNODES='2')
    assert r.returncode == 2 and 'MASTER_ADDR' in r.stderr


@pytest.mark.parametrize('variables, message', [
    (dict(BATCH_GPU='abc'), 'BATCH_GPU must be a positive integer'),
    (dict(MASTER_PORT='x'), 'MASTER_PORT must be a positive integer'),
    (dict(DURATION='-5'), 'DURATION must be a positive number of Mimg'),
    (dict(DURATION='0.0'), 'DURATION must be a positive number of Mimg'),
    (dict(NNODES='2', NODE_RANK='2', MASTER_ADDR='10.0.0.1'), 'NODE_RANK must be in 0..1'),
])
def test_bad_environment_values_are_usage_errors(env, variables, message):
    r = run(CIFAR, 'sida', 'uncond', '--dry-run', env=env, **variables)
    assert r.returncode == 2 and r.stderr.splitlines()[0] == f'error: {message}'
    assert r.stdout == ''


@pytest.mark.parametrize('mode, extra, message', [
    ('train', ['--lr', '-1'], 'error: --lr -1.0: must be >= 0'),
    ('train', ['--resume', '/elsewhere'], 'name different folders'),
    ('train', ['stray'], 'unrecognized arguments: stray'),
    ('eval', ['--trials', '0'], 'error: --trials must be at least 1'),
])
def test_a_real_launch_checks_the_extra_arguments_before_any_download(env, fake_torchrun, mode, extra, message):
    """sida.py's (fid.py's) own checks of what the user added, before the downloads: not after them, inside
    torchrun, as one line among torchrun's traceback."""
    bindir, record = fake_torchrun
    r = run(CIFAR, *(['eval'] if mode == 'eval' else []), 'sida', 'uncond', *extra, env=env,
            PATH=f'{bindir}:{env["PATH"]}', PYTHON=sys.executable)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not Path(env['SIDA_CACHE']).exists() and not record.exists()


def python_torchrun(bindir, body):
    """A torchrun on PATH that is a Python script, as pip installs it (launch.sh runs it in its own process)."""
    return make_tool(bindir, 'torchrun', '').write_text(f'#!{sys.executable}\nimport sys\n{body}\n')


def test_a_worker_failing_in_a_real_launch_ends_in_its_message_and_one_line(env, tmp_path):
    """sida.py's one-line error, then which rank failed and how, with sida.py's exit status: not torchrun's
    traceback of its own (30 lines). The real torchrun and sida.py, failing on the cached (bad) teacher."""
    cifar_cache(env, content=b'not a network')
    python_torchrun(tmp_path / 'bin', 'from torch.distributed.run import main\nsys.exit(main())')
    r = run(CIFAR, 'sida', 'uncond', env=env, PATH=f'{tmp_path / "bin"}:{env["PATH"]}', NGPU='1',
            PYTHON=sys.executable)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if not line.startswith('W')]    # (torchrun's warnings)
    assert len(errors) == 2 and errors[0].startswith('error: ') and 'edm-cifar10-32x32-uncond-vp.pkl' in errors[0], r.stderr
    assert errors[1] == 'torchrun: sida.py exited with status 1 on rank 0'


@pytest.mark.parametrize('raised, line, status', [
    ('ChildFailedError("sida.py", {3: ProcessFailure(0, 1, -9, "-"), 5: ProcessFailure(1, 2, 1, "-")})',
     'torchrun: sida.py was killed by signal 9 (SIGKILL) on rank 3 (2 ranks failed)', 137),
    ('ChildFailedError("fid.py", {0: ProcessFailure(0, 1, 143, "-")})', 'torchrun: fid.py exited with status 143 on rank 0', 143),
    ('SignalException("got signal 15", signal.SIGTERM)', 'torchrun: stopped by signal 15 (SIGTERM)', 143),
])
def test_a_launch_reports_a_failed_worker_or_a_signal_in_one_line_with_its_status(env, tmp_path, raised, line, status):
    """A worker killed (the out-of-memory killer's SIGKILL), a worker's own status, torchrun stopped by a
    scheduler's SIGTERM: one line and the shell's status for it (128 + N for signal N), so a requeue script can
    tell a preemption (143) from a failure."""
    cifar_cache(env)
    python_torchrun(tmp_path / 'bin', 'import signal\nfrom torch.distributed.elastic.multiprocessing.api import SignalException\n'
                    'from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure\n'
                    f'raise {raised}')
    r = run(CIFAR, 'sida', 'uncond', env=env, PATH=f'{tmp_path / "bin"}:{env["PATH"]}', PYTHON=sys.executable)
    assert r.stderr.splitlines() == [line] and r.returncode == status, r.stderr


@pytest.mark.parametrize('ngpu, given, threads', [('8', None, '1'), ('8', '4', '4'), ('1', None, 'unset')])
def test_several_workers_get_one_cpu_thread_each_without_torchruns_warning(env, tmp_path, ngpu, given, threads):
    """torchrun's default for several workers (OMP_NUM_THREADS=1), set by the script: torchrun then prints no
    warning about it. One worker keeps torch's default (every core); a value given stays."""
    cifar_cache(env)
    make_tool(tmp_path / 'bin', 'torchrun', f'echo "${{OMP_NUM_THREADS:-unset}}" > {tmp_path / "threads"}')
    more = {'OMP_NUM_THREADS': given} if given else {}
    r = run(CIFAR, 'sida', 'uncond', env=env, PATH=f'{tmp_path / "bin"}:{env["PATH"]}', NGPU=ngpu, **more)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'threads').read_text().strip() == threads


def test_a_launch_without_torchrun_says_so_in_one_line(env, tmp_path):
    system = '/usr/bin:/bin'
    if shutil.which('torchrun', path=system):
        pytest.skip('this system has a torchrun of its own')
    cifar_cache(env)
    r = run(CIFAR, 'sida', 'uncond', env=env, PATH=system, PYTHON=sys.executable)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        'error: torchrun is not on PATH: install PyTorch (pip install -r requirements.txt)'], r.stderr


@pytest.mark.parametrize('smi, ngpu', [('printf "GPU 0: H100\\nGPU 1: H100\\nGPU 2: H100\\n"', 3),
                                       ('exit 9', 1)])
def test_gpu_count_comes_from_nvidia_smi(env, tmp_path, smi, ngpu):
    bindir = tmp_path / 'bin'
    make_tool(bindir, 'nvidia-smi', smi)
    env = {k: v for k, v in env.items() if k != 'NGPU'}
    r = run(CIFAR, 'sida', 'uncond', '--dry-run', env=env, PATH=f'{bindir}:{env["PATH"]}')
    launcher, _, _ = split_command(r.stdout)
    assert f'--nproc_per_node={ngpu}' in launcher


@pytest.mark.parametrize('script, setting', [(CIFAR, 'cond'), (IMAGENET, '64')])
def test_duration_and_outdir_can_be_overridden(env, data64, script, setting):
    r = run(script, 'sid2a', setting, '--dry-run', env=env, DATA=str(data64), DURATION='20',
            OUTDIR='/runs/x')
    _, flags, _ = split_command(r.stdout)
    assert flags['--duration'] == '20' and flags['--outdir'] == '/runs/x'


# ---- EDM2 per size, FFHQ / AFHQv2, ImageNet 512 preparation --------------------------------------

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('size', SIZES)
def test_edm2_logvar_force_norm_and_duration_follow_upstream_per_size(env, data512, size, method):
    r = run(IMAGENET, method, f'512-{size}', '--dry-run', env=env, DATA=str(data512))
    assert r.returncode == 0, r.stderr
    _, flags, _ = split_command(r.stdout)
    on = size != 's'
    assert ('--logvar' in flags, '--force-norm' in flags) == (on, on)
    assert ('--no-logvar' in flags, '--no-force-norm' in flags) == (not on, not on)
    want = EDM2_SID2A_DURATION[size] if method == 'sid2a' else EDM2_SIDA_DURATION[size]
    assert float(flags['--duration']) == want
    assert sida.parse_args(split_command(r.stdout)[2]).logvar == on       # sida.py reads them as meant


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('dataset', ['ffhq', 'afhq'])
def test_ffhq_afhq_dry_run_carries_published_settings(env, tmp_path, dataset, method):
    data = make_dataset(tmp_path / 'faces.zip', 'png', labels=False)
    r = run(FACES, method, dataset, '--dry-run', env=env, DATA=str(data))
    assert r.returncode == 0, r.stderr
    assert 'warning' not in r.stderr
    launcher, flags, _ = split_command(r.stdout)
    assert_settings(flags, expected_settings(FACES_SIDA[dataset], method, sid_alpha=1.2, sid_duration=200))
    cache = Path(env['SIDA_CACHE'])
    edm_name = {'ffhq': 'ffhq-64x64', 'afhq': 'afhqv2-64x64'}[dataset]
    assert flags['--teacher'] == str(cache / f'edm-{edm_name}-uncond-vp.pkl')
    assert flags['--ref'] == str(cache / f'{edm_name}.npz')
    assert flags['--detector'] == str(cache / 'inception-2015-12-05.pt')
    assert flags.get('--data') == (None if method == 'sid' else str(data))   # SiD needs no real images
    assert '--cond' not in flags and flags['--metrics'] == 'fid50k'
    assert flags['--outdir'] == f'runs/{dataset}64-{method}'
    assert '--nproc_per_node=8' in launcher
    if method == 'sid2a':
        sid = networks.RELEASED_URLS[f'sid-{dataset}64']
        assert any(line.endswith(sid) for line in r.stdout.splitlines())
        assert flags['--init-generator'] == str(cache / f'sid-{dataset}64-{sid.rsplit("/", 1)[1]}')


@pytest.mark.parametrize('dataset, words', [
    ('ffhq', ['dataset_tool.py', 'images1024x1024', '--resolution=64x64', 'github.com/NVlabs/edm', 'DATA=']),
    ('afhq', ['dataset_tool.py', 'downloads/afhqv2', '--resolution=64x64', 'github.com/NVlabs/edm', 'DATA=']),
])
def test_missing_ffhq_afhq_data_prints_instructions_and_exits_1(env, tmp_path, fake_torchrun, dataset, words):
    bindir, record = fake_torchrun
    env = dict(env, PATH=f'{bindir}:{env["PATH"]}', DATA=str(tmp_path / 'absent.zip'))
    r = run(FACES, 'sida', dataset, env=env)
    assert r.returncode == 1 and r.stdout == ''
    assert 'absent.zip' in r.stderr and 'no such file' in r.stderr and 'cannot be downloaded' in r.stderr
    for word in words:
        assert word in r.stderr, word
    assert not record.exists() and not Path(env['SIDA_CACHE']).exists()


def test_ffhq_sid_runs_without_a_dataset(env, tmp_path):
    r = run(FACES, 'sid', 'ffhq', '--dry-run', env=env, DATA=str(tmp_path / 'absent.zip'))
    assert r.returncode == 0 and 'warning' not in r.stderr
    assert '--data' not in split_command(r.stdout)[1]


def test_imagenet512_preparation_encodes_the_converted_512_zip(env, tmp_path):
    r = run(IMAGENET, 'sida', '512-xs', env=env, DATA=str(tmp_path / 'absent.zip'))
    assert r.returncode == 1
    steps = r.stderr.replace('\\\n', ' ')
    convert = steps.index('dataset_tool.py convert')
    assert '--dest=datasets/img512.zip' in steps[convert:] and '--transform=center-crop-dhariwal' in steps[convert:]
    assert 'dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip' in steps
    assert 'networks.py encode-latents datasets/img512.zip datasets/img512-sd.zip' in steps
    assert steps.index('encode-latents') > convert and 'encode-latents downloads/' not in steps

# ---- eval: scoring the released generators ------------------------------------------------------

# Every row of the README's reproduction table: (script, method, setting, released name, reference file).
EVAL_ROWS = [(CIFAR, m, c, f'{m}-cifar10-{c}', 'cifar10-32x32.npz') for c in ['uncond', 'cond'] for m in METHODS] \
    + [(IMAGENET, m, '64', f'{m}-imagenet64', 'imagenet-64x64.npz') for m in METHODS] \
    + [(IMAGENET, m, f'512-{size}', f'{m}-edm2-img512-{size}', 'img512.pkl') for size in SIZES for m in METHODS
       if (size, m) != ('xxl', 'sid2a')] \
    + [(FACES, m, d, f'{m}-{d}64', f'{e}.npz') for d, e in [('ffhq', 'ffhq-64x64'), ('afhq', 'afhqv2-64x64')] for m in METHODS]


@pytest.mark.parametrize('script, method, setting, name, ref', EVAL_ROWS, ids=[row[3] for row in EVAL_ROWS])
def test_eval_dry_run_scores_the_released_generator_of_each_row(env, script, method, setting, name, ref):
    r = run(script, 'eval', method, setting, '--dry-run', env=env)       # no DATA: scoring needs none
    assert r.returncode == 0, r.stderr
    assert 'warning' not in r.stderr
    url = networks.RELEASED_URLS[name]
    assert any(line.startswith(('curl ', 'wget ')) and line.endswith(url) for line in r.stdout.splitlines())
    cache = Path(env['SIDA_CACHE'])
    network = str(cache / f'{name.replace("edm2-img512", "img512") if script == IMAGENET else name}-{url.rsplit("/", 1)[1]}')
    assert f'{network}.part' in r.stdout and 'edm-' not in r.stdout and 'edm2-img512-' not in r.stdout   # no teacher
    launcher, flags, _ = split_command(r.stdout, 'fid.py')
    assert launcher == ['torchrun', '--standalone', '--nproc_per_node=8']
    assert flags['--network'] == network
    assert flags['--ref'] == str(cache / ref)
    assert flags['--detector'] == str(cache / 'inception-2015-12-05.pt')
    assert flags['--num-images'] == '50000' and flags['--init-sigma'] == '2.5'
    assert ('--is' in flags) == (script == CIFAR)                          # the paper reports IS for CIFAR-10


def test_cifar_eval_dry_run_prints_the_exact_scoring_command(env):
    r = run(CIFAR, 'eval', 'sida', 'uncond', '--dry-run', env=env)
    cache = env['SIDA_CACHE']
    network = f'{cache}/sida-cifar10-uncond-cifar10_uncond_sida_alpha1-217920.pkl'
    assert r.stdout.splitlines()[-1] == (
        f'torchrun --standalone --nproc_per_node=8 {ROOT}/fid.py gen --network {network} '
        f'--ref {cache}/cifar10-32x32.npz --detector {cache}/inception-2015-12-05.pt --num-images 50000 --is --init-sigma 2.5')
    assert fid.parse_args(shlex.split(r.stdout.splitlines()[-1])[4:]).num == 50000


def test_eval_of_the_unreleased_xxl_sid2a_asks_for_network(env, tmp_path):
    r = run(IMAGENET, 'eval', 'sid2a', '512-xxl', '--dry-run', env=env)
    assert r.returncode == 1 and 'no released sid2a generator' in r.stderr and 'NETWORK' in r.stderr
    r = run(IMAGENET, 'eval', 'sid2a', '512-xxl', '--dry-run', env=env, NETWORK=str(tmp_path / 'mine.pkl'))
    assert r.returncode == 0 and split_command(r.stdout, 'fid.py')[1]['--network'] == str(tmp_path / 'mine.pkl')


def test_eval_real_run_downloads_network_then_launches_fid(env, tmp_path, fake_torchrun):
    bindir, record = fake_torchrun
    cache = Path(env['SIDA_CACHE'])
    cache.mkdir()
    for name in ['cifar10-32x32.npz', 'inception-2015-12-05.pt']:
        (cache / name).write_bytes(b'cached')
    source = tmp_path / 'my-generator.pt'
    source.write_bytes(b'generator weights')
    env = dict(env, PATH=f'{bindir}:{env["PATH"]}', NETWORK=source.as_uri())
    r = run(CIFAR, 'eval', 'sida', 'cond', '--batch', '32', env=env)
    assert r.returncode == 0, r.stderr
    assert (cache / 'sida-cifar10-cond-my-generator.pt').read_bytes() == b'generator weights'
    assert sorted(p.name for p in cache.iterdir()) == ['cifar10-32x32.npz', 'inception-2015-12-05.pt',
                                                      'sida-cifar10-cond-my-generator.pt']
    launched = record.read_text().splitlines()
    assert launched == shlex.split(torchrun_line(r.stdout))[1:]
    assert launched[launched.index('--network') + 1] == str(cache / 'sida-cifar10-cond-my-generator.pt')
    assert launched[-2:] == ['--batch', '32']


def test_edm2_eval_decodes_in_small_batches(env):
    _, flags, _ = split_command(run(IMAGENET, 'eval', 'sida', '512-m', '--dry-run', env=env).stdout, 'fid.py')
    assert flags['--batch'] == '16' and flags['--ref'].endswith('img512.pkl')


# ---- static checks -----------------------------------------------------------------------------

@pytest.mark.parametrize('script', SCRIPTS + [LAUNCH])
def test_script_parses_with_bash_n(script):
    r = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('script', SCRIPTS + [LAUNCH])
def test_script_passes_shellcheck(script):
    if shutil.which('shellcheck') is None:
        pytest.skip('shellcheck is not installed')
    # -x: a script is checked together with the launch.sh it sources (its settings are read there)
    r = subprocess.run(['shellcheck', '-x', str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize('script', [CIFAR, IMAGENET, FACES])
def test_script_is_executable(script):
    assert os.access(script, os.X_OK)


def executable_lines(path):
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith('#')]


@pytest.mark.parametrize('script', SCRIPTS)
def test_bash_version_is_checked_before_anything_else(script):
    # Each script's first command sources launch.sh, whose first command checks the version in POSIX
    # syntax: bash runs a file command by command, so nothing bash-4-only is read before it.
    assert executable_lines(script)[0].startswith('. "$(dirname "$0")/launch.sh"')
    assert executable_lines(LAUNCH)[0] == 'case ${BASH_VERSION-} in'
    for version, refused in [('3.2.57(1)-release', True), ('4.3.48(1)-release', True),
                             ('4.4.20(1)-release', False), ('5.2.15(1)-release', False), ('10.0.0(1)-release', False)]:
        # bash 4.4+ running the script as sourced, with BASH_VERSION set to what an older bash says
        r = subprocess.run(['bash', '-c', 'BASH_VERSION=$1; . "$0" --help', str(script), version],
                           capture_output=True, text=True, timeout=60)
        if refused:
            assert r.returncode == 1 and r.stdout == '', version
            assert r.stderr == f'error: this script needs bash >= 4.4 (this is bash {version}); on macOS: brew install bash\n'
        else:
            assert r.returncode == 0 and r.stdout.startswith('usage: '), (version, r.stderr)
    if shutil.which('dash'):                              # not bash at all: the same one line
        r = subprocess.run(['dash', str(script), 'sida', 'ffhq'], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr == 'error: this script needs bash >= 4.4 (this is not bash); on macOS: brew install bash\n'


def test_launch_sh_is_not_run_on_its_own():
    assert not os.access(LAUNCH, os.X_OK)
    r = subprocess.run(['bash', str(LAUNCH)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'sourced by the train_*.sh scripts' in r.stderr


def test_the_shell_files_repeat_no_block_of_six_lines():
    if shutil.which('duplicates') is None:
        pytest.skip('duplicates is not installed')
    r = subprocess.run(['duplicates', '--repo', str(ROOT), '--most', '200', '--seconds', '120'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if 'incomplete:' in r.stdout:
        pytest.skip('duplicates did not read the whole tree in time: ' + r.stdout)
    shell = {p.name for p in SCRIPTS + [LAUNCH]}
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith('D') and ' ~ ' in line]
    between = [' '.join(row) for row in rows if {row[1].split(':')[0], row[3].split(':')[0]} <= shell]
    assert between == [], r.stdout

# ----------------------------------------------------------------------------------------------------
# fid.py: inputs that would overwrite earlier images, exhaust memory, hang or fail only at the end; Ctrl-C.

def test_gen_refuses_an_outdir_holding_generated_images_or_their_grid_and_accepts_an_empty_one(tmp_path, capsys):
    """Images of another generator (or a smaller --num) written among old ones would be measured together."""
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    out, grid = tmp_path / 'out', tmp_path / 'out-grid.png'
    out.mkdir()
    argv = ['gen', '--network', tmp_path / 'G.pt', '--outdir', out, '--seeds']
    assert run_cli(argv + ['0-3'], capsys)[0] == 0
    images, grid_png = {p.name: p.read_bytes() for p in out.iterdir()}, grid.read_bytes()
    for remove in ([], [grid], list(out.iterdir())):        # images and grid, the images alone, the grid alone
        for p in remove:
            p.unlink()
        code, _, err = run_cli(argv + ['10-11'], capsys)
        assert code == 1 and len(err.splitlines()) == 1
        assert err.startswith(f'error: --outdir {out} has ')
        assert err.endswith(': remove them or choose another folder\n')
        if not remove:
            assert {p.name: p.read_bytes() for p in out.iterdir()} == images and grid.read_bytes() == grid_png
        grid.write_bytes(grid_png)


def test_gen_on_two_ranks_writes_every_image_once_and_then_refuses_the_folder(tmp_path):
    """Rank 0 looks for earlier images and tells the others (under NCCL a fast rank could write before a slow
    one looked); the second command is refused by every rank."""
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', os.path.join(HERE, 'fid.py'),
           'gen', '--network', str(tmp_path / 'G.pt'), '--outdir', str(tmp_path / 'out'), '--seeds', '0-6', '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{i:06d}.png' for i in range(7)] and (tmp_path / 'out-grid.png').exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and r.stderr.count('error: --outdir') == 2, r.stderr[-2000:]


def test_seeds_beyond_int64_malformed_ranges_and_too_many_seeds_are_refused(monkeypatch):
    monkeypatch.setattr(fid, 'MAX_IMAGES', 11)          # counted from the ranges, before a list of them is made
    assert fid.parse_seeds('0-5, 6-10') == list(range(11)) and fid.parse_seeds(str(2 ** 63 - 1)) == [2 ** 63 - 1]
    for seeds in ['1-', '-1', '5-3', '1,,2', '', str(2 ** 63), '99999999999999999999', '0-5,6-11']:
        with pytest.raises(UserError) as e:
            fid.parse_seeds(seeds)
        assert str(e.value).startswith(f'--seeds {seeds}: ')
    with pytest.raises(UserError, match=re.escape('--seeds 0-5,7,3-4: seed 3 is given twice')):
        fid.parse_seeds('0-5,7,3-4')                      # one image twice in FID, or one PNG written twice


def test_gen_refuses_more_images_than_max_images_before_making_their_seeds(capsys):
    for extra in (['--num', '99999999999999999999'], ['--num', '50000000', '--trials', '10']):
        with pytest.raises(SystemExit) as e:
            fid.parse_args(['gen', '--network', 'G.pt', '--ref', 'ref.npz', *extra])
        assert e.value.code == 1 and capsys.readouterr().err.endswith(f': more than {fid.MAX_IMAGES:,} images\n')


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='no named pipes here')
def test_calc_of_a_pipe_or_device_is_refused_in_one_line_instead_of_read_forever(tmp_path):
    """A pipe stands for /dev/zero too: looking for a zip's directory in either never ends."""
    os.mkfifo(tmp_path / 'pipe')
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(4), sigma=np.eye(4))
    r = subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), 'calc', '--images', str(tmp_path / 'pipe'),
                        '--ref', str(tmp_path / 'ref.npz')], capture_output=True, text=True, cwd=HERE, timeout=60)
    assert r.returncode == 1 and r.stderr == f'error: {tmp_path / "pipe"}: neither a folder nor a regular file\n'
    (tmp_path / 'images').mkdir()                        # a pipe among the images of a folder
    PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'a.png')
    os.mkfifo(tmp_path / 'images' / 'b.png')
    r = subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), 'calc', '--images', str(tmp_path / 'images'),
                        '--ref', str(tmp_path / 'ref.npz')], capture_output=True, text=True, cwd=HERE, timeout=60)
    assert r.returncode == 1 and r.stderr == f'error: {tmp_path / "images" / "b.png"}: not a regular file\n'


def test_workers_beyond_max_workers_are_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as e:
        fid.parse_args(['calc', '--images', 'x', '--ref', 'r', '--workers', '99999999999999999999'])
    assert e.value.code == 1 and capsys.readouterr().err == f'error: --workers must be 0 to {fid.MAX_WORKERS}\n'


@pytest.mark.parametrize('argv', [['ref', '--data', 'd', '--dest', 'a-file/x.npz'],
                                  ['gen', '--network', 'G.pt', '--outdir', 'a-file/out'],
                                  ['ref', '--data', 'd', '--dest', 'read-only/x.npz'],
                                  ['gen', '--network', 'G.pt', '--outdir', 'read-only/out']])
def test_a_destination_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a-file').write_text('mine')
    (tmp_path / 'read-only').mkdir(mode=0o555)
    if argv[-1].startswith('read-only') and os.access(tmp_path / 'read-only', os.W_OK):
        pytest.skip('permissions do not stop this user (root) from writing')
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f'error: {argv[-2]} {argv[-1]}: cannot write in ')
    assert err.endswith(f'{os.sep}{argv[-1].split("/")[0]} (not a writable folder)\n')


@pytest.mark.parametrize('command, failing', [('ref', '.npz'), ('gen', '.png'), ('gen', '-grid.png')])
def test_a_full_disk_when_saving_is_named_by_flag_and_path_in_one_line(tmp_path, detectors, capsys, monkeypatch,
                                                                        command, failing):
    write = networks.atomic_write

    def full(path, f, **kwargs):        # as a full disk fails: on the temporary file, which is all the OSError names
        if path.endswith(failing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + '.tmp')
        write(path, f, **kwargs)
    if command == 'ref':
        write_pngs(tmp_path / 'data', random_images(12, seed=3))
        argv = ['ref', '--data', tmp_path / 'data', '--dest', tmp_path / 'ref.npz', '--detector', detectors[64]]
        named = f'--dest {tmp_path / "ref.npz"}'
    else:
        networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
        argv = ['gen', '--network', tmp_path / 'G.pt', '--seeds', '0-3', '--outdir', tmp_path / 'out']
        grid = f' (its grid {tmp_path / "out-grid.png"})' if failing == '-grid.png' else ''
        named = f'--outdir {tmp_path / "out"}{grid}'
    monkeypatch.setattr(networks, 'atomic_write', full)
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and err == f'error: {named}: cannot write ({os.strerror(errno.ENOSPC)})\n'


def test_fid_ref_keeps_a_dest_made_by_another_program_while_it_measured(tmp_path, detectors, capsys, monkeypatch):
    write = networks.atomic_write

    def racing(path, f, **kwargs):                      # another program writes --dest just before ours is saved
        with open(path, 'wb') as other:
            other.write(b'theirs')
        write(path, f, **kwargs)
    monkeypatch.setattr(networks, 'atomic_write', racing)
    write_pngs(tmp_path / 'data', random_images(12, seed=3))
    dest, kept = tmp_path / 'ref.npz', tmp_path / 'ref-1.npz'
    code, _, err = run_cli(['ref', '--data', tmp_path / 'data', '--dest', dest, '--detector', detectors[64]], capsys)
    assert code == 1 and err == f'error: {dest} appeared while this was being written; not overwriting it: the result is {kept}\n'
    assert dest.read_bytes() == b'theirs' and np.load(kept)['sigma'].shape == 2 * np.load(kept)['mu'].shape


@pytest.mark.parametrize('fault, line', [(KeyboardInterrupt, 'interrupted'), (OSError('disk gone'), 'error: disk gone')])
def test_a_message_after_a_progress_bar_on_a_terminal_starts_a_line_of_its_own(monkeypatch, fault, line):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, 'stderr', Terminal())
    monkeypatch.setattr(fid, 'PROGRESS_SECONDS_TTY', 0)
    monkeypatch.setattr(fid.Progress, 'line_open', False)      # restored after the test

    def calc_then_fail(args, device):
        fid.Progress('measuring', 10).update(4)
        raise fault
    monkeypatch.setattr(fid, 'cmd_calc', calc_then_fail)
    assert fid.main(['calc', '--images', 'x', '--ref', 'r.npz', '--device', 'cpu']) == (130 if fault is KeyboardInterrupt else 1)
    bar, message = sys.stderr.getvalue().split('\n')[:2]
    assert bar.startswith('\rmeasuring [') and '4/10 images' in bar and message == line


def test_ctrl_c_during_gen_prints_one_line_with_the_images_written_and_exits_130(tmp_path):
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    driver = ('import os, signal, sys, fid\n'
              'signal.signal(signal.SIGINT, signal.default_int_handler)\n'   # a terminal's, even if run in the background
              'save, calls = fid.save_images, []\n'
              'def save_then_interrupt(*args):\n'
              '    save(*args)\n'
              '    calls.append(1)\n'
              '    if len(calls) == 2:\n'
              '        os.kill(os.getpid(), signal.SIGINT)\n'
              'fid.save_images = save_then_interrupt\n'
              'sys.exit(fid.main(sys.argv[1:]))\n')
    argv = ['gen', '--network', tmp_path / 'G.pt', '--seeds', '0-99', '--batch', '4', '--outdir', tmp_path / 'out']
    r = subprocess.run([sys.executable, '-c', driver, *map(str, argv)], capture_output=True, text=True, cwd=HERE,
                       timeout=120)
    assert r.returncode == 130 and r.stderr == f'interrupted: 8 images in {tmp_path / "out"}\n'     # two batches of 4
    assert len(os.listdir(tmp_path / 'out')) == 8


# ---- Mutation tests: toy/ and bench.py (eighth session)

def test_toy_heun_sampler_evaluates_2_steps_minus_1_times_down_the_karras_schedule():
    """EDM's Alg. 1: an Euler step at each t_k, Heun's correction at t_k+1 except on the last step (to 0); with
    a constant denoiser D = c the ODE dx/dt = (x - c) / t is linear in t, so the sampler ends at c exactly."""
    seen = []

    class Constant(nn.Module):
        def forward(self, x, sigma, labels):
            seen.append(sigma[0].item())
            return torch.full_like(x, 0.25)
    out = toy.heun_sampler(Constant(), torch.randn(3, 3, 4, 4), None, steps=5)
    t = [(80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(5)]   # Karras Eq. 5
    assert seen == pytest.approx([t[0], t[1], t[1], t[2], t[2], t[3], t[3], t[4], t[4]], rel=1e-6)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-5)


class PaintedClassStandIn(nn.Module):
    """A stand-in toy classifier: the class it sees is the image's first red value (images painted with a class)."""

    def forward(self, images, return_features: bool = False, no_output_bias: bool = False):
        return F.one_hot(images[:, 0, 0, 0].long(), toy.CLASSES).float()


def test_toy_accuracy_is_the_share_of_all_images_classified_as_their_label_over_batches():
    painted = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 3])                      # 8 of 10 right
    assert toy.accuracy(PaintedClassStandIn(), painted, labels, batch=4) == 0.8


def test_toy_baseline_of_real_data_measures_the_held_out_images(monkeypatch):
    calls, images = [], toy.images
    monkeypatch.setattr(toy, 'images', lambda n, seed: calls.append((n, seed)) or images(64, seed))
    metrics = toy.Metrics('cpu', num=64)
    calls.clear()
    marks = metrics.baselines(types.SimpleNamespace(label_dim=4), steps=())
    assert calls == [(64, toy.HELD_OUT_SEED)] and set(marks) == {'fd_data', 'acc_data'} and marks['acc_data'] >= 0.95
    assert set(metrics.baselines(types.SimpleNamespace(label_dim=0), steps=())) == {'fd_data'}


def test_toy_baseline_labels_name_the_teachers_evaluations():
    assert [toy.baseline_label(w) for w in ('data', 'teacher35', 'teacher17')] == [
        'real data', 'teacher (35 NFE)', 'teacher (17 NFE)']


def test_toy_classifier_file_holds_fp16_plain_tensors_and_loads_as_the_rounded_classifier(tmp_path):
    torch.manual_seed(0)
    net = toy.Classifier(width=4)
    toy.save_classifier(net, str(tmp_path / 'c.pt'), steps=3)
    data = torch.load(tmp_path / 'c.pt', weights_only=True)
    assert data['format'] == 'sida-toy-classifier' and data['meta'] == {'steps': 3} and data['kwargs']['width'] == 4
    assert all(v.dtype == torch.float16 for v in data['state_dict'].values())
    loaded = toy.load_classifier(str(tmp_path / 'c.pt'))
    for (name, v), w in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(w, v.half().float()), name
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    before = (tmp_path / 'c.pt').read_bytes()                  # never replaced (make.py refuses it before training)
    with pytest.raises(UserError, match='not overwriting it: the result is .*c-1.pt'):
        toy.save_classifier(net, str(tmp_path / 'c.pt'), steps=4)
    assert (tmp_path / 'c.pt').read_bytes() == before and toy.load_classifier(str(tmp_path / 'c-1.pt'))


def test_toy_classifier_trains_on_fresh_images_of_its_own_seeds_with_a_cosine_decay(monkeypatch):
    calls, images, lrs, Adam = [], toy.images, [], torch.optim.Adam

    class RecordingAdam(Adam):
        def step(self, *args, **kwargs):
            lrs.append(self.param_groups[0]['lr'])
            return super().step(*args, **kwargs)
    monkeypatch.setattr(toy, 'images', lambda n, seed: calls.append((n, seed)) or images(n, seed))
    monkeypatch.setattr(torch.optim, 'Adam', RecordingAdam)
    make.train_classifier(steps=4, batch=8, lr=2e-3)
    assert calls == [(8, 1_000_000 + step) for step in range(4)]          # apart from the run's sets 1, 2, 3, 4
    # lr * (1 + cos(pi * step / steps)) / 2 at steps 0..3 of 4: 1, (2 + sqrt 2) / 4, 1/2, (2 - sqrt 2) / 4 of 2e-3
    assert lrs == pytest.approx([2e-3, 1.7071068e-3, 1e-3, 0.2928932e-3], rel=1e-6)


def test_toy_teacher_trains_on_the_runs_images_with_a_warm_up_and_a_growing_ema(monkeypatch):
    """Adam (0.9, 0.99) at 1e-3 after a 100-step linear warm-up; EMA beta = (k+1)/(k+10) at step k. An optimizer
    that zeroes the weights at each step leaves the EMA at init * 1/10 * 2/11 = init / 55 after two steps."""
    calls, images, made, lrs = [], toy.images, [], []

    class ZeroingAdam:
        def __init__(self, params, lr, betas):
            self.params, self.param_groups = list(params), [{'lr': None}]
            made.append((lr, betas))

        def zero_grad(self, set_to_none=True):
            pass

        def step(self):
            lrs.append(self.param_groups[0]['lr'])
            with torch.no_grad():
                for p in self.params:
                    p.zero_()
    monkeypatch.setattr(toy, 'images', lambda n, seed: calls.append((n, seed)) or images(64, seed))
    monkeypatch.setattr(torch.optim, 'Adam', ZeroingAdam)
    monkeypatch.setattr(make, 'TEACHER_BATCH', 8)
    ema = make.train_teacher('ddpmpp', kimg=0.016, seed=0, log=lambda *_: None)       # 16 images: 2 steps of 8
    assert calls == [(4096, 1)] and made == [(1e-3, (0.9, 0.99))] and lrs == pytest.approx([1e-5, 2e-5])
    torch.manual_seed(0)
    init = networks.build_network(toy.arch('ddpmpp'))
    for (name, p), q in zip(init.named_parameters(), ema.parameters()):
        assert torch.allclose(q, p / 55, rtol=1e-5, atol=1e-12), name


def test_toy_make_writes_each_file_to_the_shipped_place_of_its_architecture(monkeypatch):
    seen = []
    monkeypatch.setattr(make, 'cmd_teacher', seen.append)
    monkeypatch.setattr(make, 'cmd_sid_generator', seen.append)
    make.main(['teacher', '--arch', 'edm2'])
    make.main(['sid-generator', '--arch', 'edm2', '--', '--device', 'cuda'])
    make.main(['teacher'])
    assert [a.dest for a in seen] == [os.path.join(HERE, 'toy', 'edm2', 'teacher.pt'),
                                      os.path.join(HERE, 'toy', 'edm2', 'sid-generator.pt'),
                                      os.path.join(HERE, 'toy', 'ddpmpp', 'teacher.pt')]
    assert seen[1].outdir == 'runs/toy-sid-edm2' and seen[1].extra == ['--device', 'cuda'] and seen[1].duration == 0.3


def test_toy_make_sid_generator_resumes_its_run_and_saves_its_final_ema_with_the_flags(monkeypatch, tmp_path):
    runs, loaded, saved = [], [], []
    monkeypatch.setattr(sida, 'distill', lambda args: runs.append(args) or {'nimg': 1024})
    monkeypatch.setattr(networks, 'load_network', lambda path: loaded.append(path) or types.SimpleNamespace(meta={'kimg': 1.024}))
    monkeypatch.setattr(networks, 'save_network', lambda G, dest, **meta: saved.append((dest, meta)))
    run = tmp_path / 'run'
    args = argparse.Namespace(dest=str(tmp_path / 'G.pt'), outdir=str(run), arch='edm2', duration=0.001, extra=['--metrics', 'none'])
    make.cmd_sid_generator(args)
    run.mkdir()
    (run / 'training-state.pt').write_bytes(b'')
    make.cmd_sid_generator(args)
    assert (runs[0].outdir, runs[0].resume) == (str(run), None) and runs[1].resume == str(run)
    assert loaded == [str(run / 'generator-000001.024.pt')] * 2
    flags = ' '.join(['--preset', 'toy', '--arch', 'edm2', *make.SID_FLAGS, '--duration', '0.001', '--metrics', 'none'])
    assert saved[0] == (str(tmp_path / 'G.pt'), {'replace': False, 'kimg': 1.024, 'teacher': 'toy/edm2/teacher.pt', 'flags': flags})


def test_toy_curves_read_a_kimg_mark_only_from_a_snapshot_near_it():
    rows = [{'kimg': 0.0, 'fd': 9.0}, {'kimg': 4.096, 'fd': 1.0}, {'kimg': 24.576, 'fd': 2.0}]
    assert [curves.near(rows, 'fd', k) for k in (0, 4, 25)] == [9.0, 1.0, 2.0]
    assert curves.near(rows, 'fd', 12) is None and curves.near(rows, 'fd', 50) is None and curves.near(rows, 'acc', 4) is None


def test_toy_curves_baselines_are_tick_0s_suffixed_keys_not_the_initial_generators():
    row = {'tick': 0, 'kimg': 0.0, 'fd': 21488.0, 'acc': 0.643, 'fd_data': 58.8, 'acc_data': 0.998,
           'fd_teacher35': 842.7, 'acc_teacher35': 0.976, 'fd_teacher17': 183.8}
    assert curves.baselines([row], 'fd') == {'data': 58.8, 'teacher35': 842.7, 'teacher17': 183.8}
    assert curves.baselines([row], 'acc') == {'data': 0.998, 'teacher35': 0.976}


def test_toy_curves_until_keeps_the_snapshot_at_that_kimg(tmp_path):
    rows = [{'tick': 0, 'kimg': 0.0}, {'tick': 1, 'kimg': 50.0, 'fd': 1.0}, {'tick': 2, 'kimg': 50.1, 'fd': 2.0}]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert [r['kimg'] for r in curves.read_run(str(tmp_path), until=50.0)] == [0.0, 50.0]


def test_toy_curves_a_title_without_runs_is_refused(tmp_path):
    with pytest.raises(SystemExit, match='curves.py: every TITLE needs at least one NAME=RUN after it'):
        curves.main([str(tmp_path / 'c.png'), 'a title alone'])
    assert not (tmp_path / 'c.png').exists()


def test_toy_sweep_starts_each_run_on_one_thread_with_its_own_flags_last(monkeypatch, tmp_path, capsys):
    started = []

    class Finished:
        returncode = 0

        def __init__(self, cmd, stdout, stderr, env):
            started.append((cmd, env['OMP_NUM_THREADS']))

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(sweep.subprocess, 'Popen', Finished)
    monkeypatch.setattr(sweep.time, 'sleep', lambda s: None)
    (tmp_path / 'runs.txt').write_text('a --seed 1\n# b --seed 9\nc --lr 1e-3 --seed 2\n')
    out = tmp_path / 'out'
    sweep.main([str(tmp_path / 'runs.txt'), str(out), '--device', 'cuda', '--', '--duration', '0.001', '--seed', '7'])
    head = [sys.executable, os.path.join(HERE, 'sida.py'), '--preset', 'toy', '--device', 'cuda', '--outdir']
    assert started == [(head + [str(out / 'a'), '--duration', '0.001', '--seed', '7', '--seed', '1'], '1'),
                       (head + [str(out / 'c'), '--duration', '0.001', '--seed', '7', '--lr', '1e-3', '--seed', '2'], '1')]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('sweep: 2 runs') and lines[1].startswith('a              no snapshot | --seed 1 (exit 0)')


def test_bench_refuses_non_positive_sizes_and_counts(capsys):
    for argv, message in [(['--iters', '0'], '--iters 0: must be > 0'), (['--resolution', '0'], '--resolution 0: must be > 0'),
                          (['--cbase', '-8'], '--cbase -8: must be > 0'), (['--label-dim', '-1'], '--label-dim -1: must be >= 0'),
                          (['--cres', '2,0,2'], '--cres 2,0,2: expected positive channel multipliers')]:
        with pytest.raises(UserError, match=re.escape(message)):
            bench.parse_runs(argv, torch.device('cpu'))
    assert bench.parse_runs(['--arch', 'ddpmpp', '--label-dim', '0'], torch.device('cpu'))[0][2].label_dim == 0
    with pytest.raises(SystemExit) as exit_:
        bench.main(['--device', 'cpu', '--iters', '0'])
    assert exit_.value.code == 1 and capsys.readouterr().err == 'error: --iters 0: must be > 0\n'


def test_bench_compile_flag_times_the_compiled_run_and_a_configuration_keeps_its_batch():
    runs = bench.parse_runs(['--compile', '--targets', 'cifar10'], torch.device('cpu'))
    assert [(name, mode, args.compile) for name, mode, args in runs] == [('cifar10', 'compile', True)]
    [(name, mode, args)] = bench.parse_runs(['--arch', 'ddpmpp', '--batch-gpu', '2'], torch.device('cpu'))
    assert (name, mode, args.batch_gpu, args.batch, args.iters, args.metrics) == ('custom', 'eager', 2, 2, 1, 'none')


def test_bench_a_failed_run_is_a_json_line_with_its_error_and_the_others_still_run(monkeypatch, capsys):
    def fake_bench(args, world, device):
        if args.arch == 'adm':
            raise RuntimeError('out of memory')
        return {'arch': args.arch}
    monkeypatch.setattr(bench, 'bench', fake_bench)
    with pytest.raises(SystemExit) as exit_:
        bench.main(['--device', 'cpu'])
    assert exit_.value.code == 1
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {'target': 'cifar10', 'mode': 'eager', 'arch': 'ddpmpp'},
        {'target': 'imagenet64', 'mode': 'eager', 'error': 'RuntimeError: out of memory'},
        {'target': 'edm2-xs', 'mode': 'eager', 'arch': 'edm2'}]
    with pytest.raises(SystemExit) as exit_:
        bench.main(['--device', 'cpu', '--targets', 'cifar10'])
    assert exit_.value.code == 0


@pytest.mark.parametrize('arch, fixture, keys', [
    ('ncsnpp', 'edm_ncsnpp_cond', ()), ('ddpmpp', 'edm_ddpmpp_uncond', ('augment_dim',))])   # CIFAR-10's DDPM++: augment_dim 9
def test_bench_song_unets_have_the_official_embedding_encoder_and_filter(arch, fixture, keys):
    import inspect
    [(_, _, args)] = bench.parse_runs(['--arch', arch], torch.device('cpu'))
    defaults = {k: v.default for k, v in inspect.signature(networks.SongUNet).parameters.items()}
    ours, official = {**defaults, **bench.network_config(args)['kwargs']}, golden(fixture)['kwargs']
    for key in ('embedding_type', 'encoder_type', 'channel_mult_noise', 'resample_filter', *keys):
        assert ours[key] == official[key], key


def test_toy_sweep_a_snapshot_equal_to_the_teacher_on_both_measures_reaches_it():
    rows = [{'tick': 0, 'kimg': 0.0, 'fd_teacher35': 100.0, 'acc_teacher35': 0.9, 'fd': 1000.0, 'acc': 0.5},
            {'kimg': 2.0, 'fd': 100.0, 'acc': 0.9}]
    assert 'both @2' in sweep.summarise('x', rows, [2])


def test_bench_result_counts_one_steady_iteration_and_images_per_second(monkeypatch):
    """A stand-in SiDA whose first iteration (creating the optimizer state) dispatches 5 + 1 operations and each
    later one 2 + 1 (views not counted), and whose generator step takes 10 ms."""
    class StandIn:
        adversarial, steps, x = True, 0, torch.zeros(3)

        def fake_score_step(self, slots):
            self.steps += 1
            for _ in range(5 if self.steps == 1 else 2):
                self.x.add_(1).view(3, 1)

        def generator_step(self, slots, use_adv):
            time.sleep(0.01)
            self.x.mul_(2)
    monkeypatch.setattr(bench, 'random_sida', lambda args, world, device: StandIn())
    [(_, _, args)] = bench.parse_runs(['--device', 'cpu', '--arch', 'ddpmpp', '--batch-gpu', '2'], torch.device('cpu'))
    result = bench.bench(args, 1, torch.device('cpu'))
    assert result['eager_ops_per_iter'] == 3 and result['batch_gpu'] == 2 and result['sec_per_iter'] >= 0.01
    assert result['img_per_s'] == pytest.approx(2 / result['sec_per_iter'], rel=0.01)
    assert {'img_per_s', 'sec_per_iter', 'peak_gb', 'gflop_per_iter', 'mfu', 'eager_ops_per_iter'} <= set(result)
    assert 'compile_s' not in result and result['mfu'] is None and result['device'] == 'cpu'


# ---- Mutation tests: resume, run folder and fid.py files (eighth session)

def test_a_row_appended_after_a_cut_line_is_a_line_of_its_own(tmp_path, capsys):
    """A write cut short (a full disk, a kill) left half a row without its newline: the next row starts a line
    of its own instead of being swallowed into the broken one."""
    log = tmp_path / 'log.jsonl'
    log.write_text('{"tick": 0, "kimg": 0.0}\n{"tick": 1, "ki')
    sida.append_row(str(log), {'tick': 2, 'kimg': 0.032})
    assert log.read_text().splitlines() == ['{"tick": 0, "kimg": 0.0}', '{"tick": 1, "ki', '{"tick": 2, "kimg": 0.032}']
    assert [r['tick'] for r in sida.read_log(str(log))] == [0, 2]
    assert 'skipped 1 unreadable line(s)' in capsys.readouterr().out


def test_the_console_of_a_resumed_run_is_appended_to_log_txt(tmp_path, capsys):
    """log.txt is the run's console, all sessions of it: a resume adds to it, and what was printed before the
    folder was claimed (the options) comes first."""
    path = tmp_path / 'log.txt'
    path.write_text('the first session\n')
    with sida.tee_console(str(path)) as start:
        print('options')
        start()
        print('tick 1')
    assert path.read_text() == 'the first session\noptions\ntick 1\n'
    assert capsys.readouterr().out == 'options\ntick 1\n'


def test_claiming_a_fresh_folder_looks_again_for_a_run_written_since_the_first_look(tmp_path):
    """Between distill's first look and the claim another run may have saved its state there."""
    state_path = str(tmp_path / 'training-state.pt')
    (tmp_path / 'training-state.pt').write_bytes(b'another run')
    with pytest.raises(UserError, match='already holds a run: continue it with --resume'):
        sida.claim_folder(str(tmp_path), True, state_path)
    sida.claim_folder(str(tmp_path), False, state_path).close()       # a resume of it: claimed
    assert (tmp_path / 'training-state.pt').read_bytes() == b'another run'


@pytest.mark.parametrize('name', ['log.txt.orig', 'args.json~', 'generator-best.pt.bak', 'metrics.pngs'])
def test_files_named_like_a_runs_with_more_to_their_name_are_not_a_runs(tmp_path, name):
    (tmp_path / name).write_text('mine')
    with pytest.raises(UserError, match=re.escape(f"holds files that are not a run's ({name})")):
        sida.refuse_earlier_run(str(tmp_path), str(tmp_path / 'training-state.pt'))


def test_reference_statistics_with_a_constant_feature_are_a_covariance(tmp_path):
    """A zero variance (a feature constant over the data set) is a valid, non-negative diagonal."""
    sigma = np.diag([1.0, 0.0, 2.0, 0.0])
    np.savez(tmp_path / 'ref.npz', mu=np.ones(4), sigma=sigma)
    mu, got = fid.load_ref(str(tmp_path / 'ref.npz'))
    np.testing.assert_array_equal(mu, np.ones(4))
    np.testing.assert_array_equal(got, sigma)


def test_reference_statistics_of_mismatched_sizes_are_refused(tmp_path):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(UserError) as error:
        fid.load_ref(str(tmp_path / 'ref.npz'))
    assert str(error.value) == f'--ref {tmp_path / "ref.npz"}: mu [4] and sigma [3, 3] are not [D] and [D, D]'


def test_urls_of_the_same_file_name_are_cached_apart(tmp_path):
    """Two sources whose URLs end in the same name (another folder, another host) are two cache entries."""
    for folder, content in (('a', b'first'), ('b', b'second')):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'ref.npz').write_bytes(content)
    cache = str(tmp_path / 'cache')
    first = networks.open_url((tmp_path / 'a' / 'ref.npz').as_uri(), cache_dir=cache)
    second = networks.open_url((tmp_path / 'b' / 'ref.npz').as_uri(), cache_dir=cache)
    assert open(first, 'rb').read() == b'first' and open(second, 'rb').read() == b'second'
    assert len(os.listdir(cache)) == 2


def test_a_read_error_in_fid_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """An OSError that no check foresaw (a disk read error here) is still a one-line error, not a traceback."""
    def failing(args, device):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / 'images' / '000.png'))
    monkeypatch.setattr(fid, 'cmd_calc', failing)
    code = fid.main(['calc', '--images', str(tmp_path / 'images'), '--ref', 'cifar10-32x32', '--device', 'cpu'])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith('error: ') and '000.png' in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('what, nth, named', [('state', 1, 'training-state.pt'), ('log row', 2, 'log.jsonl')])
def test_a_full_disk_error_names_the_file_that_could_not_be_written(tiny_teacher, tmp_path, monkeypatch, capsys,
                                                                     what, nth, named):
    if what == 'state':             # the first state, of the last tick (tick 1)
        full_disk_at(monkeypatch, torch, 'save', nth, lambda obj, f: obj.get('format') == 'sida-training-state')
    else:                           # tick 1's row (tick 0's is the first)
        full_disk_at(monkeypatch, sida, 'append_row', nth)
    with pytest.raises(SystemExit):                     # one iteration
        sida.main(tiny_run_argv(tmp_path, tiny_teacher, '--duration', '0.000008', '--tick', '0.008'))
    err = capsys.readouterr().err.strip()
    assert f'{tmp_path / named} (No space left on device)' in err and len(err.splitlines()) == 1, err


def test_a_finished_run_resumed_after_a_kill_in_its_last_snapshot_writes_its_best_generator(tiny_teacher, tmp_path,
                                                                                             monkeypatch):
    """Killed while the last (and best) generator was written: the resume writes it and generator-best.pt."""
    values = iter([2.0, 1.0])                       # fd at ticks 0 and 1: the last is the best
    monkeypatch.setattr(toy, 'Metrics', lambda device, num: 'the toy classifier, not needed')
    monkeypatch.setattr(toy, 'save_comparison', lambda *a: None)
    monkeypatch.setattr(sida.Evaluator, 'baselines', lambda self, teacher: {})
    monkeypatch.setattr(sida.Evaluator, '__call__', lambda self, G: {'fd': next(values)})
    monkeypatch.setattr(networks, 'version_key', lambda tensors: object())      # measured again, changed or not
    sida.main(tiny_run_argv(tmp_path, tiny_teacher, '--duration', '0.000008', '--tick', '0.008', '--snap', '1',
                            '--metrics', 'fd'))                                  # one iteration
    assert networks.load_network(str(tmp_path / 'generator-best.pt')).meta['kimg'] == 0.008
    # As the kill left it: the final snapshot not yet written, generator-best.pt still tick 0's.
    (tmp_path / 'generator-000000.008.pt').unlink()
    shutil.copy(tmp_path / 'generator-000000.000.pt', tmp_path / 'generator-best.pt')
    sida.main(['--resume', str(tmp_path)])
    assert networks.load_network(str(tmp_path / 'generator-000000.008.pt')).meta['kimg'] == 0.008
    best = networks.load_network(str(tmp_path / 'generator-best.pt')).meta
    assert (best['kimg'], best['fd']) == (0.008, 1.0)


def test_a_dataset_json_without_the_label_of_an_image_names_the_image(tmp_path):
    labels = json.dumps({'labels': [['a.png', 1], ['c.png', 2]]})
    with pytest.raises(UserError) as error:
        fid.parse_labels(labels, ['a.png', 'b.png', 'c.png'], str(tmp_path / 'data.zip'))
    assert str(error.value) == f'{tmp_path / "data.zip"}: dataset.json has no label for b.png'


def test_a_detector_file_that_is_not_torchscript_is_one_line_naming_the_flag(tmp_path):
    torch.save({'proj': torch.zeros(2)}, tmp_path / 'weights.pt')         # a torch file, but no TorchScript program
    with pytest.raises(UserError) as error:
        fid.load_detector(str(tmp_path / 'weights.pt'))
    assert str(error.value).startswith(f'--detector {tmp_path / "weights.pt"}: not a TorchScript detector')


def test_loading_the_detector_shows_no_torchscript_deprecation_warning(detectors, monkeypatch):
    load = torch.jit.load

    def warning_load(*args, **kwargs):          # as torch 2.14 does (FutureWarning), and earlier (DeprecationWarning)
        warnings.warn('`torch.jit.load` is deprecated. Please switch to `torch.export`.', FutureWarning)
        warnings.warn('`torch.jit.load` is deprecated.', DeprecationWarning)
        return load(*args, **kwargs)
    monkeypatch.setattr(torch.jit, 'load', warning_load)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('always')
        fid.load_detector(detectors[64])
    assert [str(w.message) for w in shown] == []


def test_a_training_state_holding_code_is_refused_without_running_it(tmp_path):
    """--resume reads the state as plain data (README, Safety): a state file that would call a function when
    unpickled is refused in one line, and the function is never called."""
    trace = tmp_path / 'executed'
    torch.save({'format': 'sida-training-state', 'nimg': 0, 'note': _SystemCall(trace)}, tmp_path / 'training-state.pt')
    args = sida.parse_args(['--resume', str(tmp_path)])
    with pytest.raises(UserError) as error:
        sida.read_state(str(tmp_path / 'training-state.pt'), args)
    assert str(error.value).startswith(f'--resume: {tmp_path / "training-state.pt"} is not a readable training state')
    assert '\n' not in str(error.value) and not trace.exists()


def damage(path):
    """Overwrite 64 bytes in the middle of a file, as a failing disk or a bad copy would (the zip stays readable)."""
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b'\xff' * 64)


def test_a_damaged_training_state_is_refused_in_one_line(tmp_path):
    """torch.load does not check the archive's checksums: without a check, the damaged tensor would be trained on."""
    path = tmp_path / 'training-state.pt'
    torch.save({'format': 'sida-training-state', 'nets': {'G': {'w': torch.zeros(100_000)}}}, path)
    damage(path)
    with pytest.raises(UserError) as error:
        sida.read_state(str(path), sida.parse_args(['--resume', str(tmp_path)]))
    assert str(error.value).startswith(f'--resume: {path} is damaged: its ') and 'fails its checksum' in str(error.value)


def test_a_damaged_network_file_is_refused_in_one_line(tiny_teacher, tmp_path):
    shutil.copy(tiny_teacher, tmp_path / 'generator.pt')
    damage(tmp_path / 'generator.pt')
    with pytest.raises(UserError) as error:
        networks.load_network(str(tmp_path / 'generator.pt'))
    assert str(error.value).startswith(f'{tmp_path / "generator.pt"} is damaged: its ') and '\n' not in str(error.value)


def test_resuming_a_run_with_snapshots_but_no_state_says_to_move_it_away(tmp_path):
    """Killed after a snapshot but before its first state: a new run will not start among the snapshots, so the
    resume's advice is to move the folder, not to start again in it."""
    (tmp_path / 'log.jsonl').write_text('{"tick": 1, "kimg": 1.024}\n')
    (tmp_path / 'generator-000001.024.pt').write_bytes(b'')
    with pytest.raises(UserError) as error:
        sida.read_state(str(tmp_path / 'training-state.pt'), sida.parse_args(['--resume', str(tmp_path)]))
    assert 'move it away and start again' in str(error.value)
    (tmp_path / 'generator-000001.024.pt').unlink()
    with pytest.raises(UserError) as error:
        sida.read_state(str(tmp_path / 'training-state.pt'), sida.parse_args(['--resume', str(tmp_path)]))
    assert 'start it again, without --resume' in str(error.value)


@pytest.mark.parametrize('edit, message', [
    (lambda state: state.update(rng=[{}]), 'random streams of another form'),
    (lambda state: state['rng'][0]['slots'].update({0: 'not a generator state'}), 'random streams of another form'),
    (lambda state: state['session_args'].update(metrics=5), 'flags of the wrong type'),
])
def test_a_training_state_of_another_form_is_one_line(tiny_teacher, tmp_path, edit, message):
    run_sida(tmp_path, tiny_teacher, '--duration', '0.000016', '--dump', '1')
    state = torch.load(tmp_path / 'training-state.pt', weights_only=True)
    edit(state)
    torch.save(state, tmp_path / 'training-state.pt')
    r = run_sida(tmp_path / 'unused', tiny_teacher, '--resume', str(tmp_path), '--duration', '0.000032', check=False)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]


def test_a_log_row_with_a_value_that_is_no_number_is_skipped(tmp_path, capsys):
    """The summary and the plot compute with every value of a row: a damaged one is left out as unreadable."""
    log = tmp_path / 'log.jsonl'
    log.write_text('{"tick": 0, "kimg": 0.0, "fd": 2.5}\n{"tick": 1, "kimg": 1.0, "fd": "oops"}\n'
                   '{"tick": 2, "kimg": 2.0, "fd": null}\n{"tick": 3, "kimg": 3.0, "fd": NaN}\n')
    rows = sida.read_log(str(log))
    assert [r['tick'] for r in rows] == [0, 3] and 'skipped 2 unreadable line(s)' in capsys.readouterr().out
    assert sida.summary(rows, 'sida')                                       # (a TypeError with the damaged rows)


def test_arch_given_again_on_resume_names_the_teacher_the_state_is_checked_against(tmp_path):
    """--preset toy --arch edm2 --resume DIR: the state's teacher does not silently replace the one --arch names
    (restore_state then refuses a state of another architecture in one line)."""
    state = dict(format='sida-training-state', nimg=0, tick=0, args={}, session_args={'teacher': 'ddpmpp/teacher.pt'},
                 teacher_config={}, teacher_sums=torch.zeros(1), nets={}, opts={}, scalers={}, rng=[])
    torch.save(state, tmp_path / 'training-state.pt')
    args = sida.parse_args(['--preset', 'toy', '--arch', 'edm2', '--resume', str(tmp_path)])
    sida.read_state(str(tmp_path / 'training-state.pt'), args)
    assert args.teacher == toy.shipped('teacher', 'edm2')
    args = sida.parse_args(['--preset', 'toy', '--resume', str(tmp_path)])
    sida.read_state(str(tmp_path / 'training-state.pt'), args)
    assert args.teacher == 'ddpmpp/teacher.pt'                               # without --arch: the state's


# ---- fid.py on damaged or odd inputs (eleventh session)

def test_a_link_loop_in_an_image_folder_counts_each_image_once(tmp_path):
    write_pngs(tmp_path / 'data', random_images(3, seed=0))
    os.symlink('.', tmp_path / 'data' / 'again')                      # without the check: 3 images, 3 more per level
    os.makedirs(tmp_path / 'other')
    write_pngs(tmp_path / 'other', random_images(1, seed=1), ['x.png'])
    os.symlink(tmp_path / 'other', tmp_path / 'data' / 'linked')      # a link to another folder is followed
    assert fid.image_names(str(tmp_path / 'data')) == ['0000.png', '0001.png', '0002.png', 'linked/x.png']


def test_a_damaged_image_in_a_zip_is_one_line_naming_it(tmp_path):
    write_pngs(tmp_path / 'data', random_images(4, seed=0, size=32))
    with zipfile.ZipFile(tmp_path / 'data.zip', 'w', zipfile.ZIP_STORED) as z:
        for name in sorted(os.listdir(tmp_path / 'data')):
            z.write(tmp_path / 'data' / name, name)
    blob = bytearray((tmp_path / 'data.zip').read_bytes())
    with zipfile.ZipFile(tmp_path / 'data.zip') as z:
        info = z.getinfo('0002.png')
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob[start + info.compress_size // 2] ^= 0xFF                          # one byte of 0002.png's data
    (tmp_path / 'data.zip').write_bytes(bytes(blob))
    with pytest.raises(UserError) as error:
        fid.load_images(str(tmp_path / 'data.zip'))
    assert str(error.value).startswith(f'{tmp_path / "data.zip"}: cannot read 0002.png in the zip, damaged')


def test_a_cifar_tarball_whose_checksum_fails_is_refused(tmp_path):
    """tarfile stops before the gzip trailer, where the CRC is checked: a flipped bit would go unnoticed."""
    path = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        blob = py2_cifar_batch(np.zeros([4, 3072], np.uint8), [0, 1, 2, 3])
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    blob = bytearray(path.read_bytes())
    blob[-8] ^= 0xFF                                                       # the CRC-32 of the gzip trailer
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError) as error:
        fid.load_images(str(path))
    assert str(error.value).startswith(f'{path}: damaged tarball')


def test_a_16_bit_image_is_refused_not_clipped(tmp_path):
    PIL.Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / 'deep.png')
    assert PIL.Image.open(tmp_path / 'deep.png').mode.startswith('I')
    message = fid._decode_image((tmp_path / 'deep.png').read_bytes(), 'deep.png')
    assert isinstance(message, str) and 'FID reads 8-bit images' in message


@pytest.mark.parametrize('label', ['1.7', '1e30', '[1, 2]', '-1', 'true'])
def test_dataset_json_labels_must_be_integers_from_0(tmp_path, label):
    with pytest.raises(UserError) as error:
        fid.parse_labels(f'{{"labels": [["a.png", 0], ["b.png", {label}]]}}', ['a.png', 'b.png'], 'data.zip')
    assert str(error.value) == 'data.zip: dataset.json has labels that are not integers from 0'


def test_gen_checks_the_reference_and_detector_before_writing_an_image(tmp_path, detectors, capsys):
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(32), sigma=np.eye(32))       # the detector gives 64 features
    code, _, err = run_cli(['gen', '--network', tmp_path / 'G.pt', '--num', 8, '--batch', 4, '--ref', tmp_path / 'ref.npz',
                            '--detector', detectors[64], '--outdir', tmp_path / 'out'], capsys)
    assert code == 1 and '32-dimensional but the detector gives 64' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_gen_refuses_an_outdir_holding_other_images(tmp_path, capsys):
    """calc --images would measure them together with the generated ones."""
    networks.save_network(small_generator(), str(tmp_path / 'G.pt'))
    write_pngs(tmp_path / 'out', random_images(2, seed=0), ['real/00000.png', 'real/00001.png'])
    code, _, err = run_cli(['gen', '--network', tmp_path / 'G.pt', '--seeds', '0-3', '--outdir', tmp_path / 'out'], capsys)
    assert code == 1 and err == f'error: --outdir {tmp_path / "out"} has 2 images: remove them or choose another folder\n'


def test_a_damaged_download_names_its_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv('SIDA_CACHE', str(tmp_path / 'cache'))
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(4), sigma=np.eye(4))
    url = (tmp_path / 'ref.npz').as_uri()
    cached = networks.open_url(url)
    with open(cached, 'r+b') as f:
        f.truncate(100)
    with pytest.raises(UserError) as error:
        fid.load_ref(url)
    assert str(error.value).endswith(f'(downloaded to {cached}: delete it to download again)')
