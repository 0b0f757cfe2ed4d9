from merlin_molar.items.images import load_image


def test_image_is_rgb_and_resized(poster_paths):
    image, problem = load_image(poster_paths[0], size=224)
    assert problem is None
    assert image.mode == "RGB" and image.size == (224, 224)


def test_original_size_kept_without_size(poster_paths):
    image, _ = load_image(poster_paths[0], size=None)
    assert image.size == (32, 32)  # the synthetic images are 32 px squares


def test_missing_and_corrupt_files_are_reported_not_raised(broken_images):
    assert load_image(broken_images["missing"]) == (None, "file not found")
    image, problem = load_image(broken_images["corrupt"])
    assert image is None and problem.startswith("unreadable image")
