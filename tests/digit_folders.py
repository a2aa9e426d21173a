"""``support_and_queries(root, ...)``: real digit scans split into a support set ``root/support/<class>/`` and
images to label ``root/<queries>/<class>/`` (the first ``n_support`` of each class are support examples)."""
import shutil

from simret.data.samples import write_fewshot_sample


def support_and_queries(root, *, classes, per_class, n_support, image_size, queries="queries"):
    write_fewshot_sample(root / "all", splits={"train": list(classes)}, per_class=per_class, image_size=image_size)
    for folder in sorted((root / "all" / "train").iterdir()):
        for n, image in enumerate(sorted(folder.iterdir())):
            target = root / (queries if n >= n_support else "support") / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    shutil.rmtree(root / "all")
    return root
