"""Networks shared by several model files: masked convolutions (PixelCNN), the U-Net."""
