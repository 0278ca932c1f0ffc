// DenoiSeg instance labels in ImageJ / Fiji (deepImageJ postprocessing of a denoiseg model).
//
// Input: the active image, the model's output with channels
//   denoised (denoisedChannels of them), background, foreground, border probabilities
// (a hyperstack with channels, or a plain stack whose slices are those channels).
// Output: a new 32-bit image "<title>_labels" with one integer label per nucleus, the same
// labels `denoiseg predict` writes:
//   1. foreground: foreground probability > threshold,
//   2. instances: 4-connected components of the foreground (numbered in raster order),
//   3. if growIntoBorder: a border pixel (border probability > background probability, not
//      foreground) within one pixel of an instance (diagonals included, the nearest first)
//      joins it; with outer borders only border pixels not touching predicted background
//      (4-neighbourhood) do (those lie between touching nuclei),
//   4. instances smaller than minSize pixels are removed and labels renumbered.
// 2D and 3D: a 3D output (a hyperstack with these channels and z slices) is labelled with
// 6-connected (face neighbour) components, numbered in z, y, x raster order, and border
// voxels join the nearest instance within sqrt(3) voxels (face, then edge, then corner
// neighbours; the smallest label among equally near ones), like `denoiseg predict` in 3D.
// The 3D path runs in the macro language voxel by voxel: seconds for 10^6 voxels, slow for
// very large volumes (use `denoiseg zoo predict` there).
// The settings below are written by `denoiseg zoo export` from the trained model.

// --- settings (denoiseg zoo export) ---
threshold = 0.5;
denoisedChannels = 1;
growIntoBorder = 1;
outerBorder = 1;
minSize = 0;
// --- end of settings ---

requires("1.52a");
setBatchMode(true);
source = getImageID();
sourceTitle = getTitle();
getDimensions(width, height, channelCount, sliceCount, frameCount);
nPlanes = denoisedChannels + 3;
channelsAsSlices = false;
is3D = false;
if (channelCount == nPlanes && sliceCount == 1 && frameCount == 1) {
    channelsAsSlices = false;
} else if (channelCount == 1 && sliceCount == nPlanes && frameCount == 1) {
    channelsAsSlices = true;
} else if (channelCount == nPlanes && sliceCount > 1 && frameCount == 1) {
    is3D = true;
} else {
    exit("denoiseg_instances.ijm: expected a 2D image or a 3D hyperstack with " + nPlanes + " channels (denoised, background, foreground, border), got " + channelCount + " channel(s), " + sliceCount + " slice(s), " + frameCount + " frame(s)");
}


// ---------------------------------------------------------------------------------- 3D

// One channel (1-based) of the 3D hyperstack `id` as a flat array, index x + width * (y + height * z).
function readChannel3D(id, channel, width, height, depth) {
    selectImage(id);
    values = newArray(width * height * depth);
    i = 0;
    for (z = 1; z <= depth; z++) {
        Stack.setPosition(channel, z, 1);
        for (y = 0; y < height; y++) {
            for (x = 0; x < width; x++) {
                values[i] = getPixel(x, y);
                i++;
            }
        }
    }
    return values;
}

// The root of `i` in the union-find forest `parent` (halving the path on the way).
function findRoot(parent, i) {
    while (parent[i] != i) {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    return i;
}

// Join the sets of `a` and `b`; the smaller label stays the root, so a component's root
// is the provisional label of its first voxel in raster order.
function joinRoots(parent, a, b) {
    a = findRoot(parent, a);
    b = findRoot(parent, b);
    if (a < b) parent[b] = a;
    if (b < a) parent[a] = b;
}

// The smallest non-zero label among the neighbours of voxel (x, y, z) at squared distance
// `distance2` (1: faces, 2: edges, 3: corners); 0 if none.
function nearestLabel3D(labels, x, y, z, width, height, depth, distance2) {
    best = 0;
    for (dz = -1; dz <= 1; dz++) {
        for (dy = -1; dy <= 1; dy++) {
            for (dx = -1; dx <= 1; dx++) {
                if (dx * dx + dy * dy + dz * dz == distance2) {
                    nx = x + dx;
                    ny = y + dy;
                    nz = z + dz;
                    if (nx >= 0 && ny >= 0 && nz >= 0 && nx < width && ny < height && nz < depth) {
                        v = labels[nx + width * (ny + height * nz)];
                        if (v > 0 && (best == 0 || v < best)) best = v;
                    }
                }
            }
        }
    }
    return best;
}

// Whether a face neighbour of voxel (x, y, z) (or the voxel itself) is set in `mask`.
function touches3D(mask, x, y, z, width, height, depth) {
    i = x + width * (y + height * z);
    if (mask[i] > 0) return true;
    if (x > 0) { if (mask[i - 1] > 0) return true; }
    if (x < width - 1) { if (mask[i + 1] > 0) return true; }
    if (y > 0) { if (mask[i - width] > 0) return true; }
    if (y < height - 1) { if (mask[i + width] > 0) return true; }
    if (z > 0) { if (mask[i - width * height] > 0) return true; }
    if (z < depth - 1) { if (mask[i + width * height] > 0) return true; }
    return false;
}

// Instance labels of the 3D output `source`: a new 32-bit stack; returns the instance count.
function instances3D(source, title, width, height, depth, threshold, denoisedChannels, growIntoBorder, outerBorder, minSize) {
    n = width * height * depth;
    plane = width * height;
    background = readChannel3D(source, denoisedChannels + 1, width, height, depth);
    foreground = readChannel3D(source, denoisedChannels + 2, width, height, depth);
    border = readChannel3D(source, denoisedChannels + 3, width, height, depth);

    // 6-connected components of the foreground: provisional labels in raster order, joined
    // with the already visited face neighbours (x - 1, y - 1, z - 1), then resolved.
    labels = newArray(n);
    parent = newArray(n + 1);
    provisional = 0;
    i = 0;
    for (z = 0; z < depth; z++) {
        for (y = 0; y < height; y++) {
            for (x = 0; x < width; x++) {
                if (foreground[i] > threshold) {
                    provisional++;
                    parent[provisional] = provisional;
                    labels[i] = provisional;
                    if (x > 0) { if (labels[i - 1] > 0) joinRoots(parent, provisional, labels[i - 1]); }
                    if (y > 0) { if (labels[i - width] > 0) joinRoots(parent, provisional, labels[i - width]); }
                    if (z > 0) { if (labels[i - plane] > 0) joinRoots(parent, provisional, labels[i - plane]); }
                }
                i++;
            }
        }
    }
    resolved = newArray(provisional + 1);
    count = 0;
    for (label = 1; label <= provisional; label++) {
        root = findRoot(parent, label);
        if (root == label) {
            count++;
            resolved[label] = count;
        } else {
            resolved[label] = resolved[root];
        }
    }
    for (i = 0; i < n; i++) labels[i] = resolved[labels[i]];

    if (growIntoBorder == 1) {
        // candidate border voxels: not foreground, border more likely than background
        candidates = newArray(n);
        predictedBackground = newArray(n);
        for (i = 0; i < n; i++) {
            if (foreground[i] <= threshold) {
                if (border[i] > background[i]) candidates[i] = 1;
                else predictedBackground[i] = 1;
            }
        }
        grown = Array.copy(labels);
        i = 0;
        for (z = 0; z < depth; z++) {
            for (y = 0; y < height; y++) {
                for (x = 0; x < width; x++) {
                    if (candidates[i] == 1 && labels[i] == 0) {
                        // outer borders: only voxels not touching predicted background (6-neighbourhood)
                        if (outerBorder == 0 || !touches3D(predictedBackground, x, y, z, width, height, depth)) {
                            v = nearestLabel3D(labels, x, y, z, width, height, depth, 1);
                            if (v == 0) v = nearestLabel3D(labels, x, y, z, width, height, depth, 2);
                            if (v == 0) v = nearestLabel3D(labels, x, y, z, width, height, depth, 3);
                            grown[i] = v;
                        }
                    }
                    i++;
                }
            }
        }
        labels = grown;
    }

    if (minSize > 0 && count > 0) {
        sizes = newArray(count + 1);
        for (i = 0; i < n; i++) sizes[labels[i]] = sizes[labels[i]] + 1;
        renumbered = newArray(count + 1);
        next = 0;
        for (label = 1; label <= count; label++) {
            if (sizes[label] >= minSize) {
                next++;
                renumbered[label] = next;
            }
        }
        for (i = 0; i < n; i++) labels[i] = renumbered[labels[i]];
        count = next;
    }

    newImage(title, "32-bit black", width, height, depth);
    i = 0;
    for (z = 1; z <= depth; z++) {
        setSlice(z);
        for (y = 0; y < height; y++) {
            for (x = 0; x < width; x++) {
                setPixel(x, y, labels[i]);
                i++;
            }
        }
    }
    return count;
}

// ---------------------------------------------------------------------------------- 2D

// Copy one output channel (1-based) into a new 32-bit image and return its id.
function copyChannel(index, title) {
    selectImage(source);
    if (channelsAsSlices) {
        setSlice(index);
    } else {
        Stack.setChannel(index);
    }
    run("Select None");
    run("Duplicate...", "title=" + title);
    run("32-bit");
    return getImageID();
}

// The smallest non-zero label within `radius` (0.5: 4-neighbourhood, 1: 3x3) of every pixel, 0 if none.
function nearestLabel(labelsId, radius, title) {
    selectImage(labelsId);
    run("Duplicate...", "title=" + title);
    id = getImageID();
    run("Macro...", "code=[v = v + (v == 0) * 1e9]");
    run("Minimum...", "radius=" + radius);
    run("Macro...", "code=[v = v * (v < 1e9)]");
    return id;
}

if (is3D) {
    count = instances3D(source, sourceTitle + "_labels", width, height, sliceCount, threshold, denoisedChannels, growIntoBorder, outerBorder, minSize);
    labels = getImageID();
} else {
    background = copyChannel(denoisedChannels + 1, "denoiseg_background");
    foreground = copyChannel(denoisedChannels + 2, "denoiseg_foreground");
    border = copyChannel(denoisedChannels + 3, "denoiseg_border");

    // Foreground mask as 0/1 (strictly above the threshold, like numpy's `>`).
    selectImage(foreground);
    run("Macro...", "code=[v = (v > " + threshold + ")]");

    // Label image: -1 marks unlabelled foreground; each 4-connected component is flood-filled
    // with the next label while scanning in raster order (row by row).
    selectImage(foreground);
    run("Duplicate...", "title=" + sourceTitle + "_labels");
    labels = getImageID();
    run("Multiply...", "value=-1");
    count = 0;
    for (y = 0; y < height; y++) {
        for (x = 0; x < width; x++) {
            if (getPixel(x, y) == -1) {
                count++;
                setColor(count);
                floodFill(x, y);
            }
        }
    }

    if (growIntoBorder == 1) {
        // candidate border pixels: not foreground and border more likely than background (0/1)
        imageCalculator("Subtract create 32-bit", border, background);
        candidates = getImageID();
        run("Macro...", "code=[v = (v > 0)]");
        imageCalculator("Subtract 32-bit", candidates, foreground);
        run("Macro...", "code=[v = (v > 0)]");
        if (outerBorder == 1) {
            // drop candidates touching predicted background (4-neighbourhood dilation = maximum, radius 0.5)
            imageCalculator("Add create 32-bit", foreground, candidates);
            bgNear = getImageID();
            run("Macro...", "code=[v = (v < 0.5)]");
            run("Maximum...", "radius=0.5");
            imageCalculator("Subtract 32-bit", candidates, bgNear);
            run("Macro...", "code=[v = (v > 0)]");
            selectImage(bgNear);
            close();
        }
        // each candidate next to an instance takes its label: a 4-neighbour's first (distance 1),
        // else a diagonal neighbour's (distance sqrt 2); among equally near ones the smallest label
        grown = nearestLabel(labels, 0.5, "denoiseg_grown");
        grownDiagonal = nearestLabel(labels, 1, "denoiseg_grown_diagonal");
        selectImage(grown);
        run("Duplicate...", "title=denoiseg_unreached");
        unreached = getImageID();
        run("Macro...", "code=[v = (v == 0)]");
        imageCalculator("Multiply 32-bit", grownDiagonal, unreached);
        imageCalculator("Add 32-bit", grown, grownDiagonal);
        imageCalculator("Multiply 32-bit", grown, candidates);
        imageCalculator("Add 32-bit", labels, grown);
        selectImage(unreached);
        close();
        selectImage(grownDiagonal);
        close();
        selectImage(grown);
        close();
        selectImage(candidates);
        close();
    }

    if (minSize > 0 && count > 0) {
        selectImage(labels);
        getHistogram(values, counts, count + 1, 0, count + 1);
        next = 0;
        for (label = 1; label <= count; label++) {
            if (counts[label] < minSize) {
                changeValues(label, label, 0);
            } else {
                next++;
                if (next != label) changeValues(label, label, next);
            }
        }
        count = next;
    }

    selectImage(background);
    close();
    selectImage(foreground);
    close();
    selectImage(border);
    close();
}

selectImage(labels);
setMinAndMax(0, maxOf(count, 1));
setBatchMode("exit and display");
print("denoiseg: " + count + " instances");
