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
// 2D only. The settings below are written by `denoiseg zoo export` from the trained model.

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
if (channelCount == nPlanes && sliceCount == 1 && frameCount == 1) {
    channelsAsSlices = false;
} else if (channelCount == 1 && sliceCount == nPlanes && frameCount == 1) {
    channelsAsSlices = true;
} else {
    exit("denoiseg_instances.ijm: expected a 2D image with " + nPlanes + " channels (denoised, background, foreground, border), got " + channelCount + " channel(s), " + sliceCount + " slice(s), " + frameCount + " frame(s)");
}

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
selectImage(labels);
setMinAndMax(0, maxOf(count, 1));
setBatchMode("exit and display");
print("denoiseg: " + count + " instances");
