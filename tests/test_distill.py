"""Label-free distillation (distill.py), specified on compact models that can represent the original exactly:
a prune of channels whose gamma and beta are 0 (sparsify_) removes channels that output exactly 0, so the
compact model equals the original, and a perturbed copy of it has an exact solution to converge to."""
import copy

import cv2
import numpy as np
import pytest
import torch

import distill as D
from models import Darknet
from prune_utils import compact_model, get_layer_set, make_plan
from tests.helpers import max_diff, mini_tiny, randomize_, raw_outputs, sparsify_
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)
from utils.errors import DarkslimError
from utils.parse_config import parse_cfg_text

S = 32          # input side: the test models' heads are 4x4 and 8x8


def exact_prune(size=S):
    """(teacher, exact compact student, plan): mini_tiny with 40% of every prunable layer's channels at
    gamma = beta = 0, pruned away."""
    teacher = randomize_(Darknet(parse_cfg_text(mini_tiny(nc=1, width=size, height=size), '<test cfg>')), 0).eval()
    layer_set = get_layer_set(teacher.module_defs, 'tiny')
    sparsify_(teacher, layer_set, share=0.4)
    plan = make_plan(teacher, layer_set, 'tiny', threshold=0.01)
    return teacher, compact_model(teacher, plan), plan


def perturb_(model, rel=0.005, heads=True, seed=3):
    """Every conv weight += N(0, rel * the layer's weight std) (the head convs only with heads=True)."""
    g = torch.Generator().manual_seed(seed)
    skip = set() if heads else set(D.head_convs(model))
    with torch.no_grad():
        for i, m in enumerate(model.module_list):
            if isinstance(m, torch.nn.Sequential) and i not in skip:
                w = m[0].weight
                w.add_(torch.randn(w.shape, generator=g) * rel * w.std())
    return model


def rand_images(n, seed, size=S):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_images(folder, n=6, seed=0):
    """n BGR images of assorted sizes with a few filled shapes, as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for k in range(n):
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        files.append(folder / f"img{k}.png")
        cv2.imwrite(str(files[-1]), img)
    return files


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the losses -------------------------------------------------------------------------------------------------

def test_an_exact_compact_model_has_zero_loss_and_its_head_inputs_are_the_teachers_kept_channels():
    teacher, student, plan = exact_prune()
    pairs = D.feature_pairs(teacher, student, plan.keep)
    assert [(p.teacher, p.student) for p in pairs] == [(9, 9), (16, 16)]       # the convs feeding the [yolo]s
    assert all(p.channels is not None for p in pairs)                        # their inputs lost channels
    x = rand_images(4, 1)
    with torch.no_grad():
        t = D.run_model(teacher, x, [p.teacher for p in pairs], mode='eval')
        s = D.run_model(student, x, [p.student for p in pairs], mode='eval')
    for p in pairs:
        assert s.inputs[p.student].shape[1] == len(p.channels) < t.inputs[p.teacher].shape[1]
        assert (s.inputs[p.student] - t.inputs[p.teacher][:, p.channels]).abs().max() < 1e-5
    assert max_diff(s.raw, t.raw) < 1e-5
    assert D.distill_loss('feature', s, t, pairs) < 1e-10
    assert D.distill_loss('head', s, t) < 1e-10
    with torch.no_grad():
        p = D.run_model(perturb_(student), x, [q.student for q in pairs], mode='eval')
    assert D.distill_loss('feature', p, t, pairs) > 1e-8
    assert D.distill_loss('head', p, t) > 1e-8


def test_head_loss_weights_box_and_class_by_teacher_objectness_and_objectness_everywhere():
    t = torch.zeros(1, 1, 1, 2, 7)                   # two cells, 5 + 2 values each
    t[..., 0, 4], t[..., 1, 4] = 20.0, -20.0         # cell 0: an object (sigmoid 1), cell 1: background (0)
    s = t.clone()
    s[..., 0, 0] += 1                                # box error at the object: weight 1 + floor
    assert D.head_loss([s], [t], floor=0.25) == pytest.approx(1.25 / 14)
    s = t.clone()
    s[..., 1, 5] += 1                                # class error on background: weight floor only
    assert D.head_loss([s], [t], floor=0.25) == pytest.approx(0.25 / 14)
    s = t.clone()
    s[..., 1, 4] += 2                                # objectness error on background: weight 1
    assert D.head_loss([s], [t], floor=0.25) == pytest.approx(4 / 14)
    assert D.head_loss([s, s], [t, t], floor=0.25) == pytest.approx(8 / 14)     # summed over heads


# --- the loop: convergence to an exact solution ----------------------------------------------------------------

@pytest.mark.parametrize('loss, augment', [('head', False), ('head', True), ('feature', False)])
def test_distillation_brings_a_perturbed_compact_model_back_to_the_original(loss, augment):
    teacher, student, plan = exact_prune()
    perturb_(student, heads=loss != 'feature')       # 'feature' does not train the head convs
    images, new = rand_images(16, 1), rand_images(4, 2)
    before = max_diff(raw_outputs(student, new), raw_outputs(teacher, new))
    pairs = D.feature_pairs(teacher, student, plan.keep)
    report = D.distill(student, teacher, images, 240, loss=loss, pairs=pairs, lr=1e-4, lrf=0.1, batch=8,
                       augment=augment, log_every=40)
    after_new = max_diff(raw_outputs(student, new), raw_outputs(teacher, new))
    after_seen = max_diff(raw_outputs(student, images), raw_outputs(teacher, images))
    assert before > 2e-3
    assert after_new < 1e-3 and after_seen < 1e-3, (before, after_new, after_seen)
    assert report.last_loss < report.first_loss / 20
    assert [r.iter for r in report.rows] == [1, 40, 80, 120, 160, 200, 240]
    assert not any(m.training for m in student.modules())                    # returned in eval mode


def test_an_exact_student_is_a_fixed_point_of_sgd_while_adam_steps_away_from_it():
    teacher, student, plan = exact_prune()
    pairs = D.feature_pairs(teacher, student, plan.keep)
    x = rand_images(4, 2)
    sgd = copy.deepcopy(student)
    D.distill(sgd, teacher, rand_images(8, 1), 10, loss='head+feature', pairs=pairs, optimizer='sgd', lr=0.1,
              batch=4)
    assert max_diff(raw_outputs(sgd, x), raw_outputs(teacher, x)) < 1e-5      # the gradient is ~0 there
    # Adam divides by the gradient's running RMS: steps of about lr whatever the gradient's size, even at the
    # solution (hence small learning rates for a student that starts close to its teacher)
    D.distill(student, teacher, rand_images(8, 1), 10, loss='head+feature', pairs=pairs, lr=1e-3, batch=4)
    assert max_diff(raw_outputs(student, x), raw_outputs(teacher, x)) > 1e-3


# --- the teacher, the student's BatchNorms, determinism ----------------------------------------------------------

def test_the_teacher_is_never_modified_and_no_gradient_reaches_it():
    teacher, student, _ = exact_prune()
    teacher.train()                                  # even a teacher left in train mode runs in eval mode
    before = state(teacher)
    D.distill(perturb_(student), teacher, rand_images(8, 1), 4, batch=4, lr=1e-3)
    assert same_state(state(teacher), before)        # weights and BN running statistics bit-identical
    assert all(p.grad is None for p in teacher.parameters())
    assert all(m.training for m in teacher.modules())                        # its modes restored
    assert any(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize('bn, changes', [('frozen', False), ('train', True)])
def test_bn_frozen_keeps_the_students_running_statistics_and_train_updates_them(bn, changes):
    teacher, student, _ = exact_prune()
    stats = {k: v for k, v in state(student).items() if 'running' in k}
    D.distill(student, teacher, rand_images(8, 1), 2, bn=bn, batch=4)
    now = {k: v for k, v in student.state_dict().items() if 'running' in k}
    assert same_state(now, stats) != changes


def test_distillation_is_deterministic_for_a_seed_and_leaves_the_callers_random_state():
    runs = []
    for _ in range(2):
        teacher, student, _ = exact_prune()
        rng = torch.get_rng_state()
        D.distill(perturb_(student), teacher, rand_images(8, 1), 3, batch=4, lr=1e-3, seed=5)
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append(state(student))
    assert same_state(*runs)


def test_tensor_views_are_the_images_when_every_augmentation_is_off_and_mirrors_when_flips_are_certain():
    x, g = rand_images(3, 1), torch.Generator().manual_seed(0)
    off = {'fliplr': 0.0, 'scale': 0.0, 'translate': 0.0, 'hsv_s': 0.0, 'hsv_v': 0.0}
    assert (D.augment_tensor(x, g, off) - x).abs().max() < 1e-5
    assert (D.augment_tensor(x, g, {**off, 'fliplr': 1.0}) - x.flip(-1)).abs().max() < 1e-5
    views = D.augment_tensor(x, g)                   # the defaults: other images, still RGB 0..1
    assert views.shape == x.shape and 0 <= views.min() and views.max() <= 1 and (views - x).abs().max() > 0.1


# --- image files: no labels needed, labels ignored ---------------------------------------------------------------

def test_a_folder_of_images_without_labels_is_enough_and_labels_change_nothing(tmp_path):
    files = write_images(tmp_path / 'images')
    teacher, student, _ = exact_prune()
    perturb_(student)
    runs = []
    for images in (files, tmp_path / 'images'):     # a list of files, then their folder
        s = copy.deepcopy(student)
        report = D.distill(s, teacher, images, 3, batch=4, lr=1e-3, augment=True, mosaic=True)
        assert report.img_size == S and report.images == len(files) and np.isfinite(report.last_loss)
        runs.append(state(s))
        labels = tmp_path / 'labels'                 # then: label files, good and garbage
        labels.mkdir(exist_ok=True)
        (labels / 'img0.txt').write_text("0 0.5 0.5 0.2 0.2\n")
        (labels / 'img1.txt').write_text("not a label at all\n7 2 2 -1\n")
    assert same_state(*runs)
    assert not same_state(runs[0], state(student))                           # it did train


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('option, value', [('iters', 0), ('iters', 2.5), ('iters', True), ('loss', 'kl'),
                                           ('bn', 'eval'), ('batch', 0), ('lr', -1.0), ('optimizer', 'lbfgs')])
def test_a_bad_option_is_a_one_line_error_naming_it(option, value):
    teacher, student, _ = exact_prune()
    args = {'iters': 1, option: value}
    with pytest.raises(DarkslimError) as e:
        D.distill(student, teacher, rand_images(2, 1), args.pop('iters'), **args)
    assert e.value.param == option
    assert str(e.value).startswith(f"{option} {value!r}; expected") and '\n' not in str(e.value)
    assert e.value.shown({option: f"--distill-{option}"}).startswith(f"--distill-{option} ")


def test_feature_pairs_that_do_not_fit_the_models_are_an_error():
    teacher, student, plan = exact_prune()
    with pytest.raises(DarkslimError, match='pass|expected') as e:
        D.feature_pairs(teacher, student)            # the head convs' inputs lost channels: keep is needed
    assert e.value.param == 'pairs'
    with pytest.raises(DarkslimError, match='no \\[convolutional\\]') as e:
        D.distill(student, teacher, rand_images(2, 1), 1, loss='feature', pairs=[(10, 10, None)])
    assert e.value.param == 'pairs'
